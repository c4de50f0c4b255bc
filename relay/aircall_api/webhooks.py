"""Which of Aircall's webhooks are the relay's, and whether they work: each webhook Aircall lists
is matched to a label of `RELAY_AIRCALL_TOKENS` by its token, in constant time (with
`relay.settings.tokens.TokenTable`, the receiver's own check), and the forwarded events it does
not subscribe to are named.

Used by `aircall-relay aircall webhooks` and the drainer's probe. Tokens stay inside this module:
what it returns carries labels, ids, URLs and events, never a token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from relay.aircall import KNOWN_EVENTS
from relay.settings import AircallToken
from relay.settings.tokens import TokenTable


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


def webhook_health(
    webhooks: Iterable[dict[str, Any]],
    tokens: Sequence[AircallToken],
    forwarded: frozenset[str] | None,
) -> WebhookHealth:
    """Match `webhooks` (as `AircallApi.webhooks` returns them) to the configured `tokens`;
    `forwarded` is RELAY_FORWARD_EVENTS (None: every event, taken as every known one)."""
    configured = TokenTable(tokens)
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
                label=configured.label_for(hook["token"]),
                events=events,
                missing_events=tuple(sorted(wanted - set(events))),
            )
        )
    return WebhookHealth(tuple(states), tuple(token.label for token in tokens))
