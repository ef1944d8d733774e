"""From a sky position to epochs: query every requested survey, fetch each epoch through the
cache, and report what failed instead of stopping.

Derived epoch files are cached too (``epochs/<survey>/<key>/`` in the cache, keyed by survey,
exposure id, position and cutout size), so a second run reads epoch files and downloads
nothing. Metadata answers are reused for at most an hour.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from astropy.coordinates import SkyCoord

from transcene.epoch import Epoch, write_epoch
from transcene.errors import TransceneError
from transcene.surveys.base import EpochRef, NoCoverage, SurveyAdapter
from transcene.surveys.cache import Cache, cache_key
from transcene.surveys.config import cache_root, load_config
from transcene.surveys.descriptor import SurveyDescriptor, load_descriptors
from transcene.surveys.http import RetryPolicy
from transcene.surveys.registry import make_adapter

__all__ = ["FetchFailure", "FetchReport", "FetchEvent", "fetch_epochs", "band_matches", "safe_name",
           "EPOCH_FORMAT_VERSION"]

log = logging.getLogger(__name__)

#: Bump when an adapter changes how it builds epochs: old cached epoch files are then ignored.
EPOCH_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class FetchFailure:
    """One epoch (or a whole survey query, ``exposure_id == ""``) that could not be fetched."""

    survey: str
    exposure_id: str
    band: str
    mjd: float
    kind: str
    reason: str
    error: str


@dataclasses.dataclass(frozen=True)
class FetchEvent:
    """Progress report: ``stage`` is ``"query"``, ``"found"``, ``"epoch"`` or ``"done"``;
    ``status`` of an epoch is ``"cached"``, ``"downloaded"`` or ``"failed"``."""

    stage: str
    survey: str
    done: int = 0
    total: int = 0
    status: str = ""
    message: str = ""


@dataclasses.dataclass
class FetchReport:
    """What a fetch produced: the epochs (with the files they are in), and the failures."""

    coord: SkyCoord
    size_pix: dict[str, int]
    epochs: list[Epoch] = dataclasses.field(default_factory=list)
    paths: list[Path] = dataclasses.field(default_factory=list)
    refs: list[EpochRef] = dataclasses.field(default_factory=list)
    failures: list[FetchFailure] = dataclasses.field(default_factory=list)
    n_cached: int = 0
    n_downloaded: int = 0
    elapsed: float = 0.0

    @property
    def n_found(self) -> int:
        return len(self.refs)

    def summary(self) -> str:
        failed_epochs = [f for f in self.failures if f.exposure_id]
        failed_surveys = [f for f in self.failures if not f.exposure_id]
        s = (f"{self.n_found} epochs found, {self.n_downloaded} downloaded, {self.n_cached} from the cache, "
             f"{len(failed_epochs)} failed ({len(self.epochs)} epoch images usable) in {self.elapsed:.1f} s")
        if failed_surveys:
            s += "; surveys that could not be queried: " + ", ".join(f"{f.survey} ({f.reason})" for f in failed_surveys)
        return s

    def failure_table(self):
        from astropy import units as u
        from astropy.table import Table

        t = Table()
        t["survey"] = [f.survey for f in self.failures]
        t["exposure_id"] = [f.exposure_id for f in self.failures]
        t["band"] = [f.band for f in self.failures]
        t["mjd"] = np.array([f.mjd for f in self.failures], float) * u.d
        t["kind"] = [f.kind for f in self.failures]
        t["error"] = [f.error for f in self.failures]
        t["reason"] = [f.reason for f in self.failures]
        return t


def band_matches(band: str, wanted: Sequence[str] | None) -> bool:
    """True if ``band`` is wanted: an exact name (``ztfg``, ``decam_r``) or a one-letter filter
    (``g``) matching the name's last letter."""
    if not wanted:
        return True
    return any(band == w or (len(w) == 1 and band.endswith(w)) for w in wanted)


def _in_time(mjd: float, start: float | None, end: float | None) -> bool:
    """Within [start, end]; an unknown (NaN) time passes (the epoch is checked once fetched)."""
    return not math.isfinite(mjd) or ((start is None or mjd >= start) and (end is None or mjd <= end))


def _epoch_key(ref: EpochRef, coord: SkyCoord, size_pix: int) -> str:
    """Cache key of a ref's epoch files. An adapter whose epochs depend on more than the exposure
    (e.g. a PSF aggregated over a group of alerts) puts that in ``locator["cache_salt"]``."""
    pos = {"ra": f"{coord.icrs.ra.deg:.7f}", "dec": f"{coord.icrs.dec.deg:.7f}", "size": int(size_pix),
           "version": EPOCH_FORMAT_VERSION, "kind": ref.kind, "salt": str(ref.locator.get("cache_salt", ""))}
    return cache_key(ref.survey, ref.exposure_id, pos)


def safe_name(name: str) -> str:
    """``name`` with every character but letters, digits, ``-_.`` replaced by ``_`` (file names)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _read_epoch_dir(d: Path) -> list[tuple[Epoch, Path]] | None:
    """The epochs of a complete cache entry, or None (absent, unfinished or damaged: refetch)."""
    from transcene.io import read_epoch

    if not (d / "COMPLETE").exists():
        return None
    try:
        return [(read_epoch(p), p) for p in sorted(d.glob("*.fits"))]
    except TransceneError as exc:  # a damaged cache entry is refetched, not trusted
        log.warning("cached epoch %s unreadable (%s); fetching it again", d, exc)
        return None


def _store_epochs(cache: Cache, ref: EpochRef, key: str, epochs: list[Epoch]) -> Path:
    """Write the epochs into a temporary directory and rename it into place (all or nothing);
    returns that directory."""
    final = cache.epoch_dir(ref.survey, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".part-"))
    try:
        names = []
        for i, ep in enumerate(epochs):
            name = f"{safe_name(ep.exposure_id or ref.exposure_id)}.fits"
            if name in names:
                name = f"{safe_name(ep.exposure_id or ref.exposure_id)}_{i}.fits"
            write_epoch(tmp / name, ep)
            names.append(name)
        (tmp / "COMPLETE").write_text(f"{ref.survey} {ref.exposure_id}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def fetch_epochs(
    coord: SkyCoord,
    *,
    surveys: Sequence[str],
    bands: Sequence[str] | None = None,
    start: float | None = None,
    end: float | None = None,
    size_pix: int | None = None,
    refresh: bool = False,
    local_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    config: Mapping[str, Any] | None = None,
    descriptors: Mapping[str, SurveyDescriptor] | None = None,
    policy: RetryPolicy | None = None,
    adapters: Mapping[str, SurveyAdapter] | None = None,
    progress: Callable[[FetchEvent], None] | None = None,
) -> FetchReport:
    """Query ``surveys`` at ``coord`` and fetch every matching epoch (through the cache).

    ``size_pix`` defaults to each survey's ``default_size_pix``; ``start``/``end`` are MJD
    bounds on science epochs (reference epochs are always kept); ``bands`` as in
    :func:`band_matches`. ``out_dir``: also copy the epoch files there (``transcene fetch``).
    A survey that cannot be queried or an epoch that cannot be fetched becomes a
    :class:`FetchFailure` in the report; nothing is raised for them.
    """
    t0 = time.perf_counter()
    config = dict(config) if config is not None else load_config()
    descriptors = descriptors if descriptors is not None else load_descriptors()
    cache = Cache(cache_root(config), refresh=refresh)
    emit = progress or (lambda ev: None)
    report = FetchReport(coord=coord, size_pix={})
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    for name in surveys:
        try:
            adapter = (adapters or {}).get(name) or make_adapter(
                name, descriptors=descriptors, config=config, cache=cache, local_dir=local_dir, policy=policy)
        except TransceneError as exc:
            report.failures.append(FetchFailure(name, "", "", math.nan, "", str(exc), type(exc).__name__))
            continue
        size = int(size_pix or adapter.ctx.descriptor.default_size_pix)
        report.size_pix[name] = size
        emit(FetchEvent("query", name, message=f"querying {name}"))
        try:
            if not adapter.covers(coord):
                raise NoCoverage(f"{name} does not cover {coord.to_string('hmsdms')}")
            refs = adapter.query(coord, size_pix=size, bands=bands, start=start, end=end)
        except NoCoverage as exc:
            log.info("%s", exc)
            emit(FetchEvent("found", name, 0, 0, message=str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - one survey's failure, expected or not, never stops the run
            why = _reason(exc)
            log.warning("%s: query failed: %s", name, why, exc_info=not isinstance(exc, TransceneError))
            report.failures.append(FetchFailure(name, "", "", math.nan, "", why, type(exc).__name__))
            emit(FetchEvent("found", name, 0, 0, status="failed", message=why))
            continue
        # references are needed whatever their date
        refs = [r for r in refs if band_matches(r.band, bands) and (r.kind == "reference" or _in_time(r.mjd, start, end))]
        report.refs.extend(refs)
        emit(FetchEvent("found", name, 0, len(refs), message=f"{len(refs)} epochs"))
        for i, ref in enumerate(refs):
            key = _epoch_key(ref, coord, size)
            got = None if cache.refresh else _read_epoch_dir(cache.epoch_dir(ref.survey, key))
            status = "cached"
            try:
                if got is None:
                    status = "downloaded"
                    epochs = adapter.fetch(ref, coord, size_pix=size)
                    if not epochs:
                        raise TransceneError(f"{name} {ref.exposure_id}: the adapter returned no epoch")
                    stored = _store_epochs(cache, ref, key, epochs)
                    # read back what was stored (float32 pixels), so that this run, a cached rerun
                    # and `transcene fit` on the fetched files all fit exactly the same numbers
                    got = _read_epoch_dir(stored)
                    if got is None:
                        raise TransceneError(f"{name} {ref.exposure_id}: epoch files could not be read back "
                                             f"from the cache ({stored})")
            except Exception as exc:  # noqa: BLE001 - one epoch's failure, expected or not, never stops the run
                status = "failed"
                why = _reason(exc)
                log.warning("%s %s: %s", name, ref.exposure_id, why, exc_info=not isinstance(exc, TransceneError))
                report.failures.append(FetchFailure(name, ref.exposure_id, ref.band, ref.mjd, ref.kind,
                                                    why, type(exc).__name__))
            else:
                # start/end also apply to epochs whose time only the product knew
                kept = [(e, p) for e, p in got if e.is_reference or _in_time(e.mjd, start, end)]
                for ep, path in kept:
                    if out_dir is not None:
                        path = Path(shutil.copy2(path, out_dir / f"{safe_name(name)}_{path.name}"))
                    report.epochs.append(ep.replace(path=str(path)))
                    report.paths.append(path)
                if status == "cached":
                    report.n_cached += 1
                else:
                    report.n_downloaded += 1
            emit(FetchEvent("epoch", name, i + 1, len(refs), status=status, message=ref.exposure_id))
    report.elapsed = time.perf_counter() - t0
    emit(FetchEvent("done", "", report.n_found, report.n_found, message=report.summary()))
    log.info("%s", report.summary())
    return report


def _reason(exc: BaseException) -> str:
    """The failure message: ours as is; anything else (an adapter bug or a product nobody
    foresaw) says so, so that it is reported rather than mistaken for bad data."""
    if isinstance(exc, TransceneError):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc} (an adapter bug or an unforeseen product; please report it)"


