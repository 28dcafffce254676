"""The embedded local stack of `python -m consumer dev` and the tests: a Kafka-protocol broker and an S3 server."""
