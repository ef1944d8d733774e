"""What every survey adapter is: a metadata query that lists epochs, and a fetch that turns one
of them into epochs of the core format (:class:`~transcene.epoch.Epoch`).

An adapter never prints and never decides how failures look: :meth:`SurveyAdapter.fetch` raises
(:class:`~transcene.surveys.http.DownloadError`, :class:`~transcene.surveys.cache.ProductError`,
:class:`SurveyError`) and the driver (:mod:`transcene.surveys.fetch`) records the failure against
the epoch and goes on with the rest.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

from transcene.errors import TransceneError

if TYPE_CHECKING:
    from astropy.coordinates import SkyCoord
    from astropy.io.fits import Header
    from astropy.wcs import WCS

    from transcene.epoch import Epoch
    from transcene.surveys.cache import Cache
    from transcene.surveys.config import Credentials
    from transcene.surveys.descriptor import SurveyDescriptor
    from transcene.surveys.http import HttpClient

__all__ = ["EpochRef", "SurveyContext", "SurveyAdapter", "SurveyError", "NoCoverage", "AuthRequired",
           "ServiceChanged", "EpochKind", "celestial_wcs", "target_pixel"]

EpochKind = Literal["science", "reference"]


class SurveyError(TransceneError, RuntimeError):
    """A survey answered, but not with something we can use (the message says what and where)."""


class NoCoverage(SurveyError):
    """The survey has no data at the position (not an error for a multi-survey run)."""


class AuthRequired(SurveyError):
    """The product needs credentials that are missing or were refused."""


class ServiceChanged(SurveyError):
    """A response lacks a column or keyword the adapter relies on: the service changed."""


@dataclasses.dataclass(frozen=True)
class EpochRef:
    """A cheap handle from a metadata query: enough to show and to fetch one epoch.

    ``mjd`` is mid-exposure in scale ``timesys`` (NaN when the metadata does not say; the
    fetched epoch then carries the time). ``exposure_id`` is unique within the survey and
    filename-safe. ``locator`` holds what :meth:`SurveyAdapter.fetch` needs (URLs, file paths);
    ``meta`` is informative (seeing, limiting magnitude...).
    """

    survey: str
    exposure_id: str
    band: str
    mjd: float
    kind: EpochKind = "science"
    timesys: str = "UTC"
    locator: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SurveyContext:
    """What an adapter may use: its descriptor, the user config, an HTTP client, the cache, the
    credentials, and an optional local directory (for adapters that read files, e.g. a directory
    of alert packets)."""

    descriptor: SurveyDescriptor
    client: HttpClient
    cache: Cache
    credentials: Credentials
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    local_dir: Path | None = None

    @property
    def name(self) -> str:
        return self.descriptor.name

    def url(self) -> str:
        """Base URL after the environment/config overrides."""
        return self.descriptor.url(self.config)

    def endpoint(self, key: str) -> str:
        return self.descriptor.endpoint(key, self.config)


class SurveyAdapter(abc.ABC):
    """Base of the adapters: subclasses implement :meth:`query` and :meth:`fetch`.

    Contract for :meth:`fetch`: every returned epoch has a WCS in which ``coord`` lies inside the
    image, a unit-sum PSF at the target, variance in image units squared (``inf`` where unusable),
    a mask, the AB zero point of the image units, mid-exposure MJD with its time scale,
    ``survey`` = the adapter name, ``exposure_id`` = the ref's, and ``is_reference`` True only for
    images known to contain no transient light. A cutout that the server clipped so that the
    target is off-centre is fine as long as the target is inside (the WCS says where); if the
    target is not inside, raise :class:`SurveyError`.
    """

    def __init__(self, ctx: SurveyContext):
        self.ctx = ctx

    @property
    def name(self) -> str:
        return self.ctx.descriptor.name

    def covers(self, coord: SkyCoord) -> bool:
        """Cheap offline footprint test (default: everywhere)."""
        return True

    @abc.abstractmethod
    def query(self, coord: SkyCoord, *, size_pix: int, bands: Sequence[str] | None = None,
              start: float | None = None, end: float | None = None) -> list[EpochRef]:
        """Epochs covering ``coord`` (metadata only; ``start``/``end`` are MJD bounds, ``bands``
        canonical band names). Reference (transient-free) epochs are included with kind
        ``"reference"``."""

    @abc.abstractmethod
    def fetch(self, ref: EpochRef, coord: SkyCoord, *, size_pix: int) -> list[Epoch]:
        """Download (through ``self.ctx.cache``) and build the epoch(s) of ``ref``."""


def celestial_wcs(header: Header, what: str) -> WCS:
    """The celestial WCS of an archive product's header.

    astropy's FITSFixedWarning (it repairs DATE-OBS/RADECSYS/PC-matrix conventions) is silenced:
    it is noise for users. An unusable WCS is a :class:`~transcene.surveys.cache.ProductError`;
    a header without a celestial WCS means the service changed (:class:`ServiceChanged`).
    """
    import warnings

    from astropy.wcs import WCS, FITSFixedWarning

    from transcene.surveys.cache import ProductError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header, naxis=2)
    except Exception as exc:  # noqa: BLE001 - wcslib/astropy raise many unrelated types
        raise ProductError(what, f"header WCS unusable: {type(exc).__name__}: {' '.join(str(exc).split())}") from exc
    if not wcs.has_celestial:
        raise ServiceChanged(f"{what}: header has no celestial WCS (CTYPE1/2 RA---/DEC--, CRVAL, CRPIX, CD)")
    return wcs.celestial


def target_pixel(wcs: WCS, coord: SkyCoord, shape: tuple[int, int], what: str, *,
                 noun: str = "cutout") -> tuple[float, float]:
    """0-based ``(x, y)`` of ``coord`` in an image of ``shape``; :class:`SurveyError` naming
    ``what`` unless it lies inside (a clipped cutout off-centre is fine, one without the target
    is not)."""
    from transcene.surveys.cache import ProductError

    try:
        x, y = (float(v) for v in wcs.world_to_pixel(coord))
    except Exception as exc:  # noqa: BLE001 - e.g. a distortion solution that does not converge
        raise ProductError(what, f"header WCS cannot place the target: {type(exc).__name__}: {exc}") from exc
    ny, nx = shape
    if not (math.isfinite(x) and math.isfinite(y) and -0.5 <= x <= nx - 0.5 and -0.5 <= y <= ny - 0.5):
        raise SurveyError(f"{what}: the target falls at pixel ({x:.1f}, {y:.1f}), outside the {nx}x{ny} {noun} "
                          "(clipped at the image edge, or the image does not cover the target)")
    return x, y
