"""mlsm: Masked Latent Semantic Modeling pre-training with offline targets."""

__version__ = "0.1.0"
