"""Survey adapters: from a sky position to epochs of the core format.

Each survey's fixed facts live in a descriptor in the top-level ``surveys/`` folder
(:mod:`transcene.surveys.descriptor`); the adapters (one module per survey) implement
:class:`~transcene.surveys.base.SurveyAdapter`; :func:`~transcene.surveys.fetch.fetch_epochs`
drives them through the HTTP client (:mod:`~transcene.surveys.http`) and the cache
(:mod:`~transcene.surveys.cache`).
"""

from transcene.surveys.base import (AuthRequired, EpochRef, NoCoverage, ServiceChanged, SurveyAdapter,
                                    SurveyContext, SurveyError)
from transcene.surveys.cache import Cache, ProductError
from transcene.surveys.descriptor import DescriptorError, SurveyDescriptor, load_descriptors
from transcene.surveys.fetch import FetchEvent, FetchFailure, FetchReport, band_matches, fetch_epochs
from transcene.surveys.http import DownloadError, HttpClient, RetryPolicy
from transcene.surveys.registry import make_adapter

__all__ = [
    "AuthRequired", "Cache", "DescriptorError", "DownloadError", "EpochRef", "FetchEvent", "FetchFailure",
    "FetchReport", "HttpClient", "NoCoverage", "ProductError", "RetryPolicy", "ServiceChanged",
    "SurveyAdapter", "SurveyContext", "SurveyDescriptor", "SurveyError", "band_matches", "fetch_epochs",
    "load_descriptors", "make_adapter",
]
