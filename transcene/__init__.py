"""transcene: light curves of transients on their host galaxies by joint scene modelling.

Typical use::

    import transcene as ts
    epochs = ts.read_epochs(["e1.fits", "e2.fits", ...])
    ds = ts.make_dataset(epochs, target, zero_before=60010)
    result = ts.fit(ds)
    table = result.lightcurve()           # astropy Table with units
    frame = table.to_pandas()             # pandas DataFrame
"""

import jax

# Photometry needs float64: hosts can be 1e4 times brighter than the transient and the linear
# solves accumulate over thousands of pixels per epoch. Enabled once, on import.
jax.config.update("jax_enable_x64", True)

__version__ = "0.1.0"

from .dataset import Dataset, make_dataset  # noqa: E402
from .epoch import Epoch, write_epoch  # noqa: E402
from .fit import fit  # noqa: E402
from .io import read_epoch, read_epochs  # noqa: E402
from .nuts import NutsOptions  # noqa: E402
from .result import FitResult, Flag, write_table  # noqa: E402
from .solve import Priors  # noqa: E402

__all__ = [
    "Epoch", "write_epoch", "read_epoch", "read_epochs", "Dataset", "make_dataset",
    "fit", "NutsOptions", "FitResult", "Flag", "Priors", "write_table", "__version__",
]
