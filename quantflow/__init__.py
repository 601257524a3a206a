"""quantflow: a Prefect-free core that calibrates, quantizes, evaluates and reports on LLM variants."""

__version__ = "0.1.0"
