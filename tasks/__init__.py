"""Thin Prefect task wrappers around ``quantflow.pipeline``: retries, tags, timeouts, artifacts, logs."""
