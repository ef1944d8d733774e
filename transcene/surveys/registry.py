"""Which adapters exist: the descriptors in ``surveys/`` name their adapter class; this module
loads them lazily (an adapter's optional dependencies are imported only when it is used)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Mapping

from transcene.surveys.base import SurveyAdapter, SurveyContext
from transcene.surveys.cache import Cache
from transcene.surveys.config import cache_root, credentials_for, load_config
from transcene.surveys.descriptor import DescriptorError, SurveyDescriptor, load_descriptors
from transcene.surveys.http import HttpClient, RetryPolicy

__all__ = ["make_adapter", "adapter_class", "retry_policy"]


def retry_policy(config: Mapping[str, Any]) -> RetryPolicy:
    """The retry policy with the config's ``[http]`` values (``attempts``, ``backoff_s``,
    ``max_wait_s``, ``budget_s``, ``timeout_s``) over the defaults."""
    import dataclasses

    section = config.get("http", {}) or {}
    known = {f.name for f in dataclasses.fields(RetryPolicy)}
    unknown = set(section) - known
    if unknown:
        raise DescriptorError(f"config [http]: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    return RetryPolicy(**section)


def adapter_class(desc: SurveyDescriptor) -> type[SurveyAdapter]:
    module, _, cls = desc.adapter.partition(":")
    if not cls:
        raise DescriptorError(f"{desc.path}: adapter must be 'module:Class', got {desc.adapter!r}")
    try:
        mod = importlib.import_module(f"transcene.surveys.{module}")
        return getattr(mod, cls)
    except (ImportError, AttributeError) as exc:
        raise DescriptorError(f"{desc.path}: adapter {desc.adapter!r} cannot be loaded: {exc}") from exc


def make_adapter(name: str, *, descriptors: Mapping[str, SurveyDescriptor] | None = None,
                 config: Mapping[str, Any] | None = None, cache: Cache | None = None,
                 refresh: bool = False, local_dir: str | Path | None = None,
                 policy: RetryPolicy | None = None, client: HttpClient | None = None) -> SurveyAdapter:
    """The adapter of survey ``name`` with its HTTP client, credentials and cache."""
    descriptors = descriptors if descriptors is not None else load_descriptors()
    if name not in descriptors:
        raise DescriptorError(f"unknown survey {name!r}; known: {', '.join(sorted(descriptors))}")
    desc = descriptors[name]
    config = dict(config) if config is not None else load_config()
    creds = credentials_for(name, config)
    if policy is None and config.get("http"):
        policy = retry_policy(config)
    if client is None:
        # a mirror or a local server may allow more than the public service: the config can say so
        section = (config.get("surveys", {}) or {}).get(name, {}) or {}
        rate = float(section.get("rate_limit_per_s", desc.rate_limit_per_s))
        client = HttpClient(policy=policy, rate_limit_per_s=rate, headers=creds.headers())
    cache = cache if cache is not None else Cache(cache_root(config), refresh=refresh)
    ctx = SurveyContext(descriptor=desc, client=client, cache=cache, credentials=creds, config=config,
                        local_dir=Path(local_dir) if local_dir is not None else None)
    return adapter_class(desc)(ctx)
