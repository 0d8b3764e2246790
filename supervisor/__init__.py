"""model-supervisor: a desired-state supervisor for GPU model-inference backends."""

__version__ = "0.1.0"
