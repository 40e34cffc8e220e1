"""passk_jax: Pass@k Training (Chen et al., arXiv 2508.10751) in pure JAX."""

__version__ = "0.1.0"
