"""transcene: light curves of transients on their host galaxies by joint scene modelling."""

import jax

# Photometry needs float64: hosts can be 1e4 times brighter than the transient and the linear
# solves accumulate over thousands of pixels per epoch. Enabled once, on import.
jax.config.update("jax_enable_x64", True)

__version__ = "0.1.0"
