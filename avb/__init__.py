"""avb: Auto-Encoding Variational Bayes and its descendants, in JAX."""

__version__ = "0.1.0"
