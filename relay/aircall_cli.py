"""`aircall-relay aircall ...`: what Aircall's Public API says about the relay's side.

`aircall webhooks [--json] [--reactivate]` lists the company's webhooks (every page), matches
each to a label of RELAY_AIRCALL_TOKENS by its token (never printed), and shows its URL, whether
it is active, and the forwarded events it does not subscribe to. `--reactivate` turns the
inactive ones of the relay back on with `PUT /v1/webhooks/{id}`, sending their `events` list back
unchanged (a PUT without it would subscribe them to every event).

Exit codes: 0 every label has an active webhook; 3 a label has none (Aircall disabled it, or no
webhook carries its token); 2 a setting is missing or Aircall refused the credentials; 1 the API
failed or answered something unexpected.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

import anyio

from relay.aircall_api import AircallApi, AircallApiError, AircallAuthError
from relay.aircall_api.webhooks import WebhookHealth, WebhookState, webhook_health
from relay.settings import Settings, SettingsError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_ACTIVE = 3


def add_aircall_commands(commands: Any) -> None:
    aircall = commands.add_parser(
        "aircall",
        help="ask Aircall's Public API about the relay's webhooks (needs RELAY_AIRCALL_API_ID "
        "and RELAY_AIRCALL_API_TOKEN)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = aircall.add_subparsers(dest="aircall_action", required=True, metavar="ACTION")
    webhooks = actions.add_parser(
        "webhooks",
        help="list Aircall's webhooks by RELAY_AIRCALL_TOKENS label: URL, active, forwarded "
        "events not subscribed; exit 3 when a label has no active webhook",
        description="List the company's webhooks (every page of GET /v1/webhooks), each matched "
        "to a RELAY_AIRCALL_TOKENS label by its token (never printed): URL, active, and the "
        "forwarded events it does not subscribe to. Exit 0 when every label has an active "
        "webhook, 3 when one has none, 2 when a setting is missing or Aircall refuses the "
        "credentials, 1 when the API fails.",
    )
    webhooks.add_argument("--json", action="store_true", help="print JSON")
    webhooks.add_argument(
        "--reactivate",
        action="store_true",
        help="turn the relay's inactive webhooks back on, keeping their events as they are",
    )


def run_aircall_command(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.aircall_tokens:
        raise SettingsError(
            "RELAY_AIRCALL_TOKENS: no Aircall token configured, so no webhook can be matched to "
            "a label; set it as for the receiver (label:token pairs)"
        )
    api = AircallApi.from_settings(settings)
    reactivated: list[WebhookState] = []
    try:
        health = anyio.run(_webhooks, api, settings, args.reactivate, reactivated)
    except AircallApiError as error:
        for hook in reactivated:  # done before the failure: said, so that nothing is hidden
            print(_reactivated_line(hook), file=sys.stderr)
        if isinstance(error, AircallAuthError):
            print(f"aircall-relay: {error}", file=sys.stderr)
            return EXIT_USAGE
        print(f"aircall-relay: Aircall's Public API failed: {error}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(_as_json(health, reactivated), indent=2))
    else:
        _print_text(health, reactivated, sys.stdout)
    return EXIT_NOT_ACTIVE if health.labels_without_active_webhook() else EXIT_OK


async def _webhooks(
    api: AircallApi, settings: Settings, reactivate: bool, reactivated: list[WebhookState]
) -> WebhookHealth:
    """The webhooks by label; with `reactivate`, after turning the relay's inactive ones on
    (each appended to `reactivated` once Aircall confirmed it)."""
    async with api:
        listed = await api.webhooks()
        health = webhook_health(listed, settings.aircall_tokens, settings.forward_events)
        if not reactivate:
            return health
        for state in health.inactive_matched():
            body = {"active": True, "events": list(state.events)}
            answer = await api.update_webhook(state.webhook_id, body)
            if sorted(answer["events"]) != sorted(state.events) or answer["active"] is not True:
                raise AircallApiError(
                    f"PUT /v1/webhooks/{state.webhook_id}: Aircall answered the webhook with "
                    f"active {answer['active']} and {len(answer['events'])} events, not active "
                    f"with the {len(state.events)} sent"
                )
            reactivated.append(state)
            listed = [answer if hook["webhook_id"] == state.webhook_id else hook for hook in listed]
        return webhook_health(listed, settings.aircall_tokens, settings.forward_events)


def _reactivated_line(hook: WebhookState) -> str:
    return (
        f"reactivated webhook {hook.webhook_id} (label {hook.label}, {hook.url}), its "
        f"{len(hook.events)} events kept as they were"
    )


def _as_json(health: WebhookHealth, reactivated: list[WebhookState]) -> dict[str, Any]:
    return {
        "webhooks": [hook.as_json() for hook in health.webhooks],
        "labels": {
            label: {
                "active": active,
                "webhooks": [hook.webhook_id for hook in health.webhooks if hook.label == label],
            }
            for label, active in health.active_by_label().items()
        },
        "labels_without_active_webhook": health.labels_without_active_webhook(),
        "reactivated": [hook.webhook_id for hook in reactivated],
    }


def _print_text(health: WebhookHealth, reactivated: list[WebhookState], out: TextIO) -> None:
    ours = sum(1 for hook in health.webhooks if hook.label is not None)
    print(f"Aircall webhooks: {len(health.webhooks)}, of which {ours} of this relay", file=out)
    rows = [("LABEL", "STATE", "URL", "NAME", "FORWARDED EVENTS NOT SUBSCRIBED")]
    for hook in sorted(health.webhooks, key=lambda hook: (hook.label is None, hook.label or "")):
        if hook.label is None:
            missing = "(not this relay's: its token matches no label)"
        else:
            missing = ", ".join(hook.missing_events) or "none"
        rows.append(
            (
                hook.label or "-",
                "active" if hook.active else "INACTIVE",
                hook.url,
                hook.custom_name or "",
                missing,
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[4]]).rstrip(), file=out)
    for hook in reactivated:
        print(_reactivated_line(hook), file=out)
    missing_labels = health.labels_without_active_webhook()
    if not missing_labels:
        print(f"Every label has an active webhook: {', '.join(health.labels)}.", file=out)
        return
    for label in missing_labels:
        if any(hook.label == label for hook in health.webhooks):
            why = "its webhook is inactive (Aircall disables a webhook after repeated failed "
            why += "deliveries): run `aircall-relay aircall webhooks --reactivate`"
        else:
            why = "no webhook of Aircall carries its token: create one with the relay's URL, "
            why += "or fix the token in RELAY_AIRCALL_TOKENS"
        print(f"label {label}: no active webhook; {why}", file=out)
