"""mergekit-permute: align and merge Transformers trained from different initializations."""

__version__ = "0.1.0"
