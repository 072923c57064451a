"""mergekit-mode: Mixture-of-Domain-Experts checkpoints in the canonical Mixtral format."""

__version__ = "0.1.0"
