"""JAX's persistent compilation cache, for applications (the CLI, nightly scripts).

A fit compiles its programs once per process: ~1 minute of a first 100-epoch fit, ~20 s of a
small one. With the cache a new process loads them from disk instead (measured: a 22-epoch fit
42 s in a fresh process, 24 s in the next). The library never calls this: it changes JAX's
process-wide configuration, which only the application that owns the process may decide.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["enable_compile_cache", "COMPILE_CACHE_ENV"]

log = logging.getLogger(__name__)

#: set to 0 to keep the cache off (the test suite does, so that tests never write outside tmp)
COMPILE_CACHE_ENV = "TRANSCENE_COMPILE_CACHE"
#: programs that compile faster than this are not worth a file (seconds)
_MIN_COMPILE_S = 0.2


def enable_compile_cache(directory: str | Path | None = None, *, min_compile_s: float = _MIN_COMPILE_S) -> Path | None:
    """Cache compiled programs under ``directory`` (default: ``<transcene cache>/jax``, see
    ``surveys.config.cache_root``), those that took at least ``min_compile_s`` seconds to compile.
    Returns the directory, or None when ``$TRANSCENE_COMPILE_CACHE`` is ``0`` or the directory
    cannot be created (then nothing changes: the cache only saves time)."""
    if os.environ.get(COMPILE_CACHE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    import jax

    from .surveys.config import cache_root

    path = Path(directory) if directory is not None else cache_root() / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("compilation cache off: cannot create %s (%s)", path, exc)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_s))
    log.debug("compiled programs cached in %s", path)
    return path
