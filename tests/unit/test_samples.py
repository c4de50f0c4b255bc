"""The sample webhooks the package ships: every event of Segment's Aircall catalogue, so that the
tests and the demo need nothing outside the package (issue 10, item 14)."""

from __future__ import annotations

import relay.testing
from relay import aircall
from relay.testing.sample_payloads import SAMPLES_DIRECTORY, sample_events, sample_payload
from tests.support import EXAMPLES, SAMPLE_TOKEN, sample


def test_the_package_ships_a_sample_of_each_catalogue_event() -> None:
    assert sample_events() == sorted(aircall.SEGMENT_CATALOGUE_EVENTS)
    for event in sample_events():
        body = sample_payload(event)
        assert body["token"] == "REPLACED-AT-RUN-TIME"  # no real token is shipped
        assert aircall.validate_envelope(dict(body)).event == event


def test_the_tests_read_the_samples_of_the_package() -> None:
    assert EXAMPLES == SAMPLES_DIRECTORY
    assert SAMPLES_DIRECTORY.parent.samefile(relay.testing.__path__[0])
    assert sample("call.created") == sample_payload("call.created", token=SAMPLE_TOKEN)


def test_the_sample_call_replays_one_call_in_the_order_aircall_sent_it() -> None:
    """aircall.SAMPLE_CALL_EVENTS, which the demo, the benchmarks and the tests replay: the
    shipped samples of one call, at strictly increasing timestamps, with every event of the
    catalogue's call life cycle in it."""
    bodies = [sample_payload(event) for event in aircall.SAMPLE_CALL_EVENTS]
    assert [body["event"] for body in bodies] == list(aircall.SAMPLE_CALL_EVENTS)
    assert {(body["resource"], body["data"]["id"]) for body in bodies} == {("call", 1903456789)}
    timestamps = [body["timestamp"] for body in bodies]
    assert timestamps == sorted(set(timestamps))
    lifecycle = set(aircall.CALL_LIFECYCLE) & set(aircall.SEGMENT_CATALOGUE_EVENTS)
    assert lifecycle <= set(aircall.SAMPLE_CALL_EVENTS)
