"""R-Drop on DeepSpeed: the training engine (config, R-Drop hook, trainer, checkpoints, monitoring)."""
__version__ = "0.1.0"
