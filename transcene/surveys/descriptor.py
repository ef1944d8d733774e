"""Survey descriptors: the fixed facts of one survey, read from ``surveys/<name>.toml``.

The descriptors live in the repository's top-level ``surveys/`` folder (one file per survey);
``TRANSCENE_SURVEYS_DIR`` points elsewhere. Base URLs resolve, in this order, from the
environment (``TRANSCENE_<NAME>_URL``), the config file (``[surveys.<name>] url``), then the
descriptor, so any adapter can be pointed at a mirror or a local test server.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from transcene.errors import TransceneError

__all__ = ["SurveyDescriptor", "DescriptorError", "descriptors_dir", "load_descriptors", "env_name"]

CREDENTIAL_LEVELS = ("no", "optional", "yes")


class DescriptorError(TransceneError, ValueError):
    """A survey descriptor file is missing, unreadable or lacks a required key."""


def env_name(survey: str, what: str) -> str:
    """``TRANSCENE_<SURVEY>_<WHAT>`` with the survey upper-cased and ``-`` turned into ``_``."""
    return f"TRANSCENE_{survey.upper().replace('-', '_')}_{what.upper()}"


@dataclasses.dataclass(frozen=True)
class SurveyDescriptor:
    """One survey's fixed facts (see ``surveys/README.md`` for the meaning of each field).

    ``base_url`` is the descriptor's own value; :meth:`url` applies the overrides.
    """

    name: str
    title: str
    adapter: str
    bands: tuple[str, ...]
    pixel_scale_arcsec: float
    default_size_pix: int
    zero_point: str
    time: str
    astrometric_precision_arcsec: float
    needs_credentials: str = "no"
    base_url: str = ""
    endpoints: Mapping[str, str] = dataclasses.field(default_factory=dict)
    rate_limit_per_s: float = 0.0
    credentials: tuple[str, ...] = ()
    notes: str = ""
    path: str = ""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def url(self, config: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None) -> str:
        """The base URL after overrides (environment, then ``config['surveys'][name]['url']``)."""
        environ = os.environ if environ is None else environ
        url = environ.get(env_name(self.name, "url"))
        if not url and config:
            url = (config.get("surveys", {}).get(self.name, {}) or {}).get("url")
        return (url or self.base_url).rstrip("/")

    def endpoint(self, key: str, config: Mapping[str, Any] | None = None, *,
                 environ: Mapping[str, str] | None = None) -> str:
        """Absolute URL of endpoint ``key`` (``[endpoints]`` table) under the resolved base URL."""
        if key not in self.endpoints:
            raise DescriptorError(f"{self.path or self.name}: no endpoint {key!r} in [endpoints] "
                                  f"(has {', '.join(sorted(self.endpoints)) or 'none'})")
        return self.url(config, environ=environ) + "/" + self.endpoints[key].lstrip("/")


_REQUIRED = {
    "name": str, "title": str, "adapter": str, "bands": list, "pixel_scale_arcsec": (int, float),
    "default_size_pix": int, "zero_point": str, "time": str, "astrometric_precision_arcsec": (int, float),
}
_OPTIONAL = {
    "needs_credentials": str, "base_url": str, "endpoints": dict, "rate_limit_per_s": (int, float),
    "credentials": list, "notes": str,
}


def descriptors_dir() -> Path:
    """``$TRANSCENE_SURVEYS_DIR`` or the repository's ``surveys/`` folder."""
    env = os.environ.get("TRANSCENE_SURVEYS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "surveys"


def read_descriptor(path: str | os.PathLike) -> SurveyDescriptor:
    """Read and check one descriptor file; errors name the file and the key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DescriptorError(f"{path}: cannot read survey descriptor: {exc}") from exc
    for key, typ in _REQUIRED.items():
        if key not in raw:
            raise DescriptorError(f"{path}: required key {key!r} missing")
        if not isinstance(raw[key], typ) or isinstance(raw[key], bool):
            raise DescriptorError(f"{path}: key {key!r} has type {type(raw[key]).__name__}, expected {typ}")
    for key, typ in _OPTIONAL.items():
        if key in raw and not isinstance(raw[key], typ):
            raise DescriptorError(f"{path}: key {key!r} has type {type(raw[key]).__name__}, expected {typ}")
    if raw["name"] != path.stem:
        raise DescriptorError(f"{path}: name {raw['name']!r} differs from the file name {path.stem!r}")
    level = raw.get("needs_credentials", "no")
    if level not in CREDENTIAL_LEVELS:
        raise DescriptorError(f"{path}: needs_credentials must be one of {CREDENTIAL_LEVELS}, got {level!r}")
    if raw["pixel_scale_arcsec"] <= 0 or raw["default_size_pix"] < 3 or raw["astrometric_precision_arcsec"] < 0:
        raise DescriptorError(f"{path}: need pixel_scale_arcsec > 0, default_size_pix >= 3 and "
                              "astrometric_precision_arcsec >= 0")
    known = set(_REQUIRED) | set(_OPTIONAL)
    return SurveyDescriptor(
        name=raw["name"], title=raw["title"], adapter=raw["adapter"], bands=tuple(raw["bands"]),
        pixel_scale_arcsec=float(raw["pixel_scale_arcsec"]), default_size_pix=int(raw["default_size_pix"]),
        zero_point=raw["zero_point"], time=raw["time"],
        astrometric_precision_arcsec=float(raw["astrometric_precision_arcsec"]),
        needs_credentials=level, base_url=raw.get("base_url", ""), endpoints=dict(raw.get("endpoints", {})),
        rate_limit_per_s=float(raw.get("rate_limit_per_s", 0.0)), credentials=tuple(raw.get("credentials", ())),
        notes=raw.get("notes", ""), path=str(path), extra={k: v for k, v in raw.items() if k not in known},
    )


def load_descriptors(directory: str | os.PathLike | None = None) -> dict[str, SurveyDescriptor]:
    """All descriptors in ``directory`` (default :func:`descriptors_dir`), keyed by name."""
    directory = Path(directory) if directory is not None else descriptors_dir()
    files = sorted(directory.glob("*.toml"))
    if not files:
        raise DescriptorError(f"{directory}: no survey descriptors (*.toml); set TRANSCENE_SURVEYS_DIR")
    return {d.name: d for d in map(read_descriptor, files)}
