"""On-disk cache for survey downloads.

Layout under the root (``transcene.surveys.config.cache_root``)::

    products/<survey>/<kk>/<key>.<ext>     immutable products (cutouts, PSF files, packets)
    metadata/<survey>/<key>.bin            metadata answers, reused for at most ``metadata_ttl_s``
    epochs/<survey>/<key>/<exposure>.fits  epoch files made from the products (the core format)

Keys are SHA-256 digests of the survey name, the URL and the sorted query parameters, so two
positions or two cutout sizes never share an entry (both are in the query); credentials are
never part of a key (they travel in headers). Every write goes to a temporary file in the same
directory, is verified (it must open as FITS, Avro or a tar archive, as declared), and only then
renamed into place, so a failed or half-finished download never enters the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from transcene.errors import TransceneError

__all__ = ["Cache", "ProductError", "cache_key", "verify_bytes", "DEFAULT_METADATA_TTL_S"]

log = logging.getLogger(__name__)

#: Metadata answers are reused for at most an hour: a nightly run must see new epochs.
DEFAULT_METADATA_TTL_S = 3600.0

Kind = Literal["fits", "avro", "tar", "text", "json", "bytes"]


class ProductError(TransceneError, ValueError):
    """A downloaded product is not what was asked for (HTML error page, truncated FITS, ...)."""

    def __init__(self, what: str, problem: str):
        self.what, self.problem = what, problem
        super().__init__(f"{what}: {problem}")


def cache_key(survey: str, url: str, params: Mapping[str, Any] | None = None) -> str:
    canon = json.dumps([survey, url, sorted((str(k), str(v)) for k, v in (params or {}).items())])
    return hashlib.sha256(canon.encode()).hexdigest()


def verify_bytes(content: bytes, kind: Kind, what: str) -> None:
    """Raise :class:`ProductError` unless ``content`` opens as ``kind``."""
    if not content:
        if kind == "text":
            return  # an empty search answer can mean "no rows"; the adapter decides
        raise ProductError(what, "empty response")
    head = content[:512].lstrip().lower()
    html = head.startswith(b"<!doctype html") or head.startswith(b"<html")
    if (kind in ("fits", "avro", "tar") and (html or head.startswith(b"<?xml"))) or (kind in ("text", "json") and html):
        snippet = content[:200].decode("utf-8", "replace").replace("\n", " ")
        raise ProductError(what, f"expected {kind.upper()}, got an HTML/XML page: {snippet!r}")
    try:
        if kind == "fits":
            from astropy.io import fits

            with fits.open(io.BytesIO(content), memmap=False) as hdul:
                hdul.verify("exception")
                if not any(h.data is not None for h in hdul):
                    raise ValueError("no HDU holds data")
        elif kind == "avro":
            import fastavro

            records = list(fastavro.reader(io.BytesIO(content)))
            if not records:
                raise ValueError("no records")
        elif kind == "tar":
            with tarfile.open(fileobj=io.BytesIO(content)) as tf:
                if not tf.getmembers():
                    raise ValueError("empty archive")
        elif kind == "json":
            json.loads(content)
    except ProductError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to parse means a bad product
        raise ProductError(what, f"does not open as {kind.upper()}: {type(exc).__name__}: {exc}") from exc


class Cache:
    """File cache for one run. ``refresh=True`` ignores what is there (and overwrites it)."""

    def __init__(self, root: str | os.PathLike, *, refresh: bool = False,
                 metadata_ttl_s: float = DEFAULT_METADATA_TTL_S, clock: Callable[[], float] = time.time):
        self.root = Path(root)
        self.refresh = refresh
        self.metadata_ttl_s = min(float(metadata_ttl_s), DEFAULT_METADATA_TTL_S)
        self._clock = clock
        self.hits = 0
        self.misses = 0

    # -- paths -------------------------------------------------------------------------------
    def product_path(self, survey: str, key: str, ext: str) -> Path:
        return self.root / "products" / survey / key[:2] / f"{key}.{ext}"

    def epoch_dir(self, survey: str, key: str) -> Path:
        return self.root / "epochs" / survey / key

    # -- writes ------------------------------------------------------------------------------
    def write_atomic(self, path: Path, content: bytes, kind: Kind, what: str) -> Path:
        """Verify ``content`` as ``kind`` and write it to ``path`` via a temporary file + rename."""
        verify_bytes(content, kind, what)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-", suffix=path.suffix)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    # -- reads with download -----------------------------------------------------------------
    def product(self, client, survey: str, url: str, params: Mapping[str, Any] | None = None, *,
                kind: Kind = "fits", ext: str | None = None, what: str | None = None,
                key_extra: Mapping[str, Any] | None = None) -> tuple[Path, bool]:
        """Path of the product at ``url``+``params``, downloading it if needed.

        ``key_extra`` enters the cache key but not the request: a version the URL does not
        show (e.g. the build number of a reference image rebuilt under the same path).

        Returns ``(path, from_cache)``. Raises :class:`~transcene.surveys.http.DownloadError` or
        :class:`ProductError`; neither leaves anything in the cache.
        """
        key = cache_key(survey, url, {**(params or {}), **{f"__key_{k}": v for k, v in (key_extra or {}).items()}})
        path = self.product_path(survey, key, ext or kind)
        if path.exists() and not self.refresh:
            self.hits += 1
            return path, True
        self.misses += 1
        resp = client.get(url, params)
        self.write_atomic(path, resp.content, kind, what or resp.url)
        return path, False

    def metadata(self, client, survey: str, url: str, params: Mapping[str, Any] | None = None, *,
                 kind: Kind = "text", what: str | None = None, method: str = "GET",
                 data: Any = None, json_body: Any = None,
                 validate: Callable[[bytes], None] | None = None) -> bytes:
        """Bytes of a metadata answer, reused for at most ``metadata_ttl_s`` seconds.

        ``validate(content)`` may raise to keep an answer out of the cache (e.g. a table that
        lacks a column); an HTML page is never accepted for ``kind`` text or json.
        """
        key = cache_key(survey, url, {**(params or {}), "__body__": json.dumps([data, json_body], default=str)})
        path = self.root / "metadata" / survey / f"{key}.bin"
        if not self.refresh and path.exists() and self._clock() - path.stat().st_mtime < self.metadata_ttl_s:
            self.hits += 1
            return path.read_bytes()
        self.misses += 1
        resp = client.get(url, params, method=method, data=data, json=json_body)
        if validate is not None:
            validate(resp.content)
        self.write_atomic(path, resp.content, kind, what or resp.url)
        return resp.content
