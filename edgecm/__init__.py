"""edgecm: CoreMatching inference for LLaVA-family models on small GPUs."""

__version__ = "0.1.0"
