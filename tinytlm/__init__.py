"""tinytlm: a small, fast, readable engine for pre-training and studying tiny BERT models."""
__version__ = "0.1.0"
