"""Pydantic models of every message and document the service reads or writes."""
