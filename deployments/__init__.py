"""Work pools, base job templates and deployment helpers (see prefect.yaml and docs/operations.md)."""
