"""HTTP for the survey adapters: retries with backoff inside a time budget, a per-host rate
limit, and credentials that only ever travel in headers.

Retried: connection errors, timeouts, HTTP 429 and 5xx (``Retry-After`` is honoured, capped by
the budget). Not retried: other 4xx (the request itself is wrong). A request that still fails
raises :class:`DownloadError` with the URL (no secrets: they are never in URLs) and the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Mapping
from urllib.parse import urlencode

import requests

from transcene.errors import TransceneError

__all__ = ["HttpClient", "RetryPolicy", "DownloadError", "Response"]

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class DownloadError(TransceneError, RuntimeError):
    """A request failed for good (after retries, or with a status that is not worth retrying)."""

    def __init__(self, url: str, reason: str, *, status: int | None = None):
        self.url, self.reason, self.status = url, reason, status
        super().__init__(f"{url}: {reason}")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries at most, waiting ``backoff_s * 2**k`` (capped at ``max_wait_s``) between
    them, all within ``budget_s`` seconds per request; ``timeout_s`` per attempt."""

    attempts: int = 5
    backoff_s: float = 1.0
    max_wait_s: float = 30.0
    budget_s: float = 120.0
    timeout_s: float = 60.0

    def __post_init__(self):
        if self.attempts < 1 or self.budget_s <= 0 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise ValueError(f"RetryPolicy needs attempts >= 1, budget_s > 0, timeout_s > 0 and backoff_s >= 0; "
                             f"got {self}")


@dataclasses.dataclass(frozen=True)
class Response:
    url: str
    status: int
    content: bytes
    headers: Mapping[str, str]


class HttpClient:
    """One session per survey: ``get(url, params)`` with retries, rate limit and auth headers.

    ``sleep`` and ``clock`` are injectable so tests run the backoff without waiting.
    """

    def __init__(self, *, policy: RetryPolicy | None = None, rate_limit_per_s: float = 0.0,
                 headers: Mapping[str, str] | None = None, user_agent: str | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 session: requests.Session | None = None):
        from transcene import __version__

        self.policy = policy or RetryPolicy()
        self.rate_limit_per_s = float(rate_limit_per_s)
        self._session = session or requests.Session()
        self._session.headers["User-Agent"] = user_agent or f"transcene/{__version__}"
        self._auth = dict(headers or {})
        self._sleep, self._clock = sleep, clock
        self._lock = threading.Lock()
        self._next_slot = 0.0

    def _throttle(self) -> None:
        if self.rate_limit_per_s <= 0:
            return
        with self._lock:
            now = self._clock()
            wait = self._next_slot - now
            self._next_slot = max(now, self._next_slot) + 1.0 / self.rate_limit_per_s
        if wait > 0:
            self._sleep(wait)

    def get(self, url: str, params: Mapping[str, Any] | None = None, *, method: str = "GET",
            data: Any = None, json: Any = None, accept_status: tuple[int, ...] = (200,)) -> Response:
        """Fetch ``url`` (``params`` go in the query string; never put secrets there)."""
        shown = url + ("?" + urlencode(params, doseq=True) if params else "")
        pol = self.policy
        start = self._clock()
        last = "no attempt made"
        status = None
        for attempt in range(pol.attempts):
            self._throttle()
            left = pol.budget_s - (self._clock() - start)
            if left <= 0:
                break
            try:
                r = self._session.request(method, url, params=params, data=data, json=json, headers=self._auth,
                                          timeout=min(pol.timeout_s, left))
            except requests.RequestException as exc:
                last, status, retry_after = f"{type(exc).__name__}: {exc}", None, None
            else:
                if r.status_code in accept_status:
                    return Response(r.url, r.status_code, r.content, dict(r.headers))
                status = r.status_code
                last = f"HTTP {r.status_code} {r.reason}"
                if r.status_code not in RETRY_STATUS:
                    raise DownloadError(shown, last, status=status)
                retry_after = _retry_after(r.headers.get("Retry-After"))
            wait = min(pol.max_wait_s, pol.backoff_s * 2**attempt)
            if retry_after is not None:
                wait = max(wait, min(retry_after, pol.max_wait_s))
            if attempt + 1 >= pol.attempts or (self._clock() - start) + wait > pol.budget_s:
                break
            log.info("%s: %s; retrying in %.1f s (attempt %d/%d)", shown, last, wait, attempt + 2, pol.attempts)
            self._sleep(wait)
        raise DownloadError(shown, f"{last} (gave up after {attempt + 1} attempts, "
                                   f"{self._clock() - start:.1f} s of a {pol.budget_s:.0f} s budget)", status=status)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff
