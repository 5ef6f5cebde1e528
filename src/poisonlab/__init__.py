"""poisonlab: data-poisoning research on language models (after Souly et al., arXiv 2510.07192)."""

__version__ = "0.1.0"
