"""User configuration: survey URL overrides, credentials and the cache location.

File: ``$TRANSCENE_CONFIG`` or ``$XDG_CONFIG_HOME/transcene/config.toml`` (default
``~/.config/transcene/config.toml``), e.g.::

    cache_dir = "/data/transcene-cache"

    [http]                    # retries (defaults: 5 attempts, backoff 1 s doubling, 120 s budget)
    attempts = 5
    backoff_s = 1.0
    budget_s = 120.0

    [surveys.ztf]
    url = "https://irsa-mirror.example.org"
    user = "me@example.org"
    password = "..."          # or TRANSCENE_ZTF_PASSWORD in the environment

    [surveys.ztf-alerts]
    token = "..."
    rate_limit_per_s = 0      # no throttling (e.g. for a local mirror); default from the descriptor

Credentials come from the environment (``TRANSCENE_<NAME>_TOKEN``, ``_USER``, ``_PASSWORD``) or
this file, never from the command line. They travel only in HTTP headers: never in a URL, a cache
key or a log line (:class:`Credentials` hides them in its repr).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

from transcene.surveys.descriptor import DescriptorError, env_name, tomllib

__all__ = ["Credentials", "load_config", "config_path", "credentials_for", "cache_root"]


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    if environ.get("TRANSCENE_CONFIG"):
        return Path(environ["TRANSCENE_CONFIG"])
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "transcene" / "config.toml"


def load_config(path: str | os.PathLike | None = None, *, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The config file as a dict (empty when the file does not exist)."""
    path = Path(path) if path is not None else config_path(environ)
    if not path.exists():
        return {}
    try:
        cfg = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DescriptorError(f"{path}: cannot read the transcene config file: {exc}") from exc
    surveys = cfg.get("surveys", {})
    if not isinstance(surveys, dict) or not all(isinstance(v, dict) for v in surveys.values()):
        raise DescriptorError(f"{path}: [surveys.<name>] must be tables")
    return cfg


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A token or a user/password pair; ``repr`` never shows the secret."""

    token: str | None = dataclasses.field(default=None, repr=False)
    user: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)

    def __bool__(self) -> bool:
        return bool(self.token or (self.user and self.password))

    def headers(self, scheme: str = "Bearer") -> dict[str, str]:
        """HTTP headers that carry the credentials (``Authorization``)."""
        if self.token:
            return {"Authorization": f"{scheme} {self.token}"}
        if self.user and self.password:
            import base64

            pair = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            return {"Authorization": f"Basic {pair}"}
        return {}


def credentials_for(survey: str, config: Mapping[str, Any] | None = None, *,
                    environ: Mapping[str, str] | None = None) -> Credentials:
    """Credentials of ``survey`` from the environment, else the config file (may be empty)."""
    environ = os.environ if environ is None else environ
    section = ((config or {}).get("surveys", {}) or {}).get(survey, {}) or {}
    get = lambda what: environ.get(env_name(survey, what)) or section.get(what)  # noqa: E731
    return Credentials(token=get("token"), user=get("user"), password=get("password"))


def cache_root(config: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None) -> Path:
    """``$TRANSCENE_CACHE_DIR``, the config's ``cache_dir``, or ``$XDG_CACHE_HOME/transcene``."""
    environ = os.environ if environ is None else environ
    if environ.get("TRANSCENE_CACHE_DIR"):
        return Path(environ["TRANSCENE_CACHE_DIR"])
    if config and config.get("cache_dir"):
        return Path(config["cache_dir"]).expanduser()
    return Path(environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")) / "transcene"
