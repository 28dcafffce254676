"""Kafka: client factories, the poll loop and its lanes, what a record becomes, publishing events and dead letters, lag."""
