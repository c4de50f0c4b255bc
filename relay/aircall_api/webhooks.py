"""Which of Aircall's webhooks are the relay's, and whether they work: each webhook Aircall lists
is matched to a label of `RELAY_AIRCALL_TOKENS` by its token, in constant time (the SHA-256 of
the given token is compared with that of *every* configured token with `hmac.compare_digest`,
as the receiver does), and the forwarded events it does not subscribe to are named.

Used by `aircall-relay aircall webhooks` and the drainer's probe. Tokens stay inside this module:
what it returns carries labels, ids, URLs and events, never a token.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from relay.aircall import KNOWN_EVENTS
from relay.settings import AircallToken


@dataclass(frozen=True, slots=True)
class WebhookState:
    """One of Aircall's webhooks, as the relay sees it (no token)."""

    webhook_id: str
    custom_name: str | None
    url: str
    active: bool
    label: str | None  # the RELAY_AIRCALL_TOKENS label whose token it carries; None: not ours
    events: tuple[str, ...]
    missing_events: tuple[str, ...]  # forwarded events it does not subscribe to

    def as_json(self) -> dict[str, Any]:
        return {
            "webhook_id": self.webhook_id,
            "custom_name": self.custom_name,
            "url": self.url,
            "active": self.active,
            "label": self.label,
            "events": list(self.events),
            "missing_forwarded_events": list(self.missing_events),
        }


@dataclass(frozen=True, slots=True)
class WebhookHealth:
    webhooks: tuple[WebhookState, ...]
    labels: tuple[str, ...]  # the configured labels, in their order

    def active_by_label(self) -> dict[str, bool]:
        """Each configured label: whether at least one active webhook carries its token."""
        return {
            label: any(hook.active for hook in self.webhooks if hook.label == label)
            for label in self.labels
        }

    def labels_without_active_webhook(self) -> list[str]:
        return [label for label, active in self.active_by_label().items() if not active]

    def inactive_matched(self) -> list[WebhookState]:
        return [hook for hook in self.webhooks if hook.label is not None and not hook.active]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def label_of(token: str, configured: Sequence[tuple[str, bytes]]) -> str | None:
    """The label whose token is `token`; every entry is compared, in constant time each."""
    given = _digest(token)
    found: str | None = None
    for label, digest in configured:
        if hmac.compare_digest(given, digest):
            found = label
    return found


def webhook_health(
    webhooks: Iterable[dict[str, Any]],
    tokens: Sequence[AircallToken],
    forwarded: frozenset[str] | None,
) -> WebhookHealth:
    """Match `webhooks` (as `AircallApi.webhooks` returns them) to the configured `tokens`;
    `forwarded` is RELAY_FORWARD_EVENTS (None: every event, taken as every known one)."""
    configured = [(token.label, _digest(token.token.reveal())) for token in tokens]
    wanted = KNOWN_EVENTS if forwarded is None else forwarded
    states = []
    for hook in webhooks:
        events = tuple(hook["events"])
        states.append(
            WebhookState(
                webhook_id=hook["webhook_id"],
                custom_name=hook.get("custom_name"),
                url=hook["url"],
                active=hook["active"],
                label=label_of(hook["token"], configured),
                events=events,
                missing_events=tuple(sorted(wanted - set(events))),
            )
        )
    return WebhookHealth(tuple(states), tuple(token.label for token in tokens))
