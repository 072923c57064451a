"""mergekit-mode: Mixture-of-Domain-Experts checkpoints in standard MoE formats (mergekit_mode.formats)."""

__version__ = "0.1.0"
