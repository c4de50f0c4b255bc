"""Aircall's events: the catalogue Segment documents, the newer ones Aircall sends, the call's
life cycle (the tie-break of events of one key), the sample call's webhooks, and why an event is
not forwarded. Pure data; `relay.aircall` re-exports it with the envelope and identity.
"""

from __future__ import annotations

from typing import Final

# The 26 events of Segment's Aircall catalogue: the default forward list.
SEGMENT_CATALOGUE_EVENTS: Final[tuple[str, ...]] = (
    "number.created",
    "number.opened",
    "number.closed",
    "number.deleted",
    "contact.created",
    "contact.updated",
    "contact.deleted",
    "user.created",
    "user.opened",
    "user.connected",
    "user.closed",
    "user.disconnected",
    "user.deleted",
    "call.created",
    "call.answered",
    "call.hungup",
    "call.ended",
    "call.assigned",
    "call.archived",
    "call.tagged",
    "call.untagged",
    "call.commented",
    "call.transferred",
    "call.ringing_on_agent",
    "call.agent_declined",
    "call.voicemail_left",
)

# Events Aircall documents beyond the Segment catalogue (see shared/reference/aircall-webhooks.md
# §4). They are not forwarded by default, but an operator may add any of them to the forward
# list; a skipped row says whether its event is known at all, which helps spot typos.
NEWER_KNOWN_EVENTS: Final[tuple[str, ...]] = (
    "call.external_transferred",
    "call.unsuccessful_transfer",
    "call.hold",
    "call.unhold",
    "call.ivr_option_selected",
    "call.comm_assets_generated",
    "user.wut_start",
    "user.wut_end",
    "user.created.v2",
    "user.deleted.v2",
    "user.connected.v2",
    "user.disconnected.v2",
    "user.opened.v2",
    "user.closed.v2",
    "user.wut_start.v2",
    "user.wut_end.v2",
    "message.sent",
    "message.received",
    "message.status_updated",
    "group_message.sent",
    "group_message.received",
    "group_message.status_updated",
    "transcription.created",
    "summary.created",
    "topics.created",
    "sentiment.created",
    "action_item.created",
    "playbook_result.created",
    "playbook_result.updated",
    "realtime_transcription.utterances_received",
    "custom_summary.result_created",
    "custom_summary.result_updated",
    "call_evaluation.created",
    "call_evaluation.updated",
    "ai_voice_agent.started",
    "ai_voice_agent.ended",
    "ai_voice_agent.escalated",
    "ai_voice_agent.summary",
    "analytics.report_created",
    "analytics.report_failed",
    "integration.deleted",
)

KNOWN_EVENTS: Final[frozenset[str]] = frozenset(SEGMENT_CATALOGUE_EVENTS + NEWER_KNOWN_EVENTS)

# Tie-break between events of one key that carry the same Aircall timestamp: the order of a
# call's life. Events not listed rank after all of these ("then the rest", PRODUCT §6).
CALL_LIFECYCLE: Final[tuple[str, ...]] = (
    "call.created",
    "call.ringing_on_agent",
    "call.agent_declined",
    "call.answered",
    "call.hold",
    "call.unhold",
    "call.transferred",
    "call.external_transferred",
    "call.unsuccessful_transfer",
    "call.hungup",
    "call.ended",
)
_LIFECYCLE_RANK: Final[dict[str, int]] = {event: rank for rank, event in enumerate(CALL_LIFECYCLE)}
OTHER_EVENTS_RANK: Final[int] = len(CALL_LIFECYCLE)

# The webhooks of one answered call, in the order Aircall sends them: its life cycle's events that
# the Segment catalogue holds, then what agents do to the call afterwards. The shipped sample
# webhooks are such a call; the demo, the benchmarks and the tests replay it.
SAMPLE_CALL_EVENTS: Final[tuple[str, ...]] = (
    *(event for event in CALL_LIFECYCLE if event in SEGMENT_CATALOGUE_EVENTS),
    *("call.tagged", "call.commented", "call.assigned", "call.untagged", "call.archived"),
)


def lifecycle_rank(event: str) -> int:
    """Rank of an event in a call's life, for ties on the Aircall timestamp."""
    return _LIFECYCLE_RANK.get(event, OTHER_EVENTS_RANK)


def skip_reason(event: str) -> str:
    """Why an accepted event that is not in the forward list is kept but not forwarded."""
    if event in KNOWN_EVENTS:
        return "filtered: event not in RELAY_FORWARD_EVENTS"
    return "unknown event: not a known Aircall event, and not in RELAY_FORWARD_EVENTS"
