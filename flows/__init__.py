"""Prefect flows: the quantflow DAG."""
