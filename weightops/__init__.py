"""weightops: weight-space alignment tooling for LLM checkpoints."""

__version__ = "0.1.0"
