"""Aircall's Public API: the client (`AircallApi`, client.py) and its pace (limiter.py).

Used by the commands that ask Aircall (`aircall webhooks`, reconciliation) and by the drainer's
webhook probe; the settings are `RELAY_AIRCALL_API_*` (relay/settings/table.py).
"""

from relay.aircall_api.client import (
    DEFAULT_BASE_URL,
    LISTING_CAP,
    PER_PAGE,
    AircallApi,
    AircallApiError,
    AircallAuthError,
    AircallNotFound,
    PageCallback,
    check_call,
    check_webhook,
)
from relay.aircall_api.limiter import DEFAULT_REQUESTS_PER_MINUTE, RateLimiter

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_REQUESTS_PER_MINUTE",
    "LISTING_CAP",
    "PER_PAGE",
    "AircallApi",
    "AircallApiError",
    "AircallAuthError",
    "AircallNotFound",
    "PageCallback",
    "RateLimiter",
    "check_call",
    "check_webhook",
]
