"""`aircall-relay aircall webhooks` as a real process against the fake Aircall: the webhooks by
label, the exit codes (0 every label active, 3 one is not, 2 credentials or settings, 1 the API
failing), `--reactivate` keeping each webhook's events, `--json`, and no token in any output."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relay.testing.fake_aircall import FakeAircall
from tests.acceptance.processes import RelayProcess, relay_env, run_relay

API_ID = "fake-api-id"
API_TOKEN = "fake-api-token-0123456789abcdef"
MAIN_TOKEN = "main-webhook-token-0123456789"
SECOND_TOKEN = "second-webhook-token-0123456789"
OTHER_TOKEN = "someone-elses-token-0123456789"
RELAY_URL = "https://relay.example/aircall/webhook"
SECRETS = (API_TOKEN, MAIN_TOKEN, SECOND_TOKEN, OTHER_TOKEN)


@pytest.fixture
def fake() -> Iterator[FakeAircall]:
    with FakeAircall(api_id=API_ID, api_token=API_TOKEN) as server:
        yield server


def run(
    fake: FakeAircall, tmp_path: Path, *args: str, **settings: str
) -> subprocess.CompletedProcess[str]:
    values = {
        "aircall_api_id": API_ID,
        "aircall_api_token": API_TOKEN,
        "aircall_api_url": fake.base_url,
        "aircall_tokens": f"main:{MAIN_TOKEN},second:{SECOND_TOKEN}",
        "forward_events": "call.created,call.hungup,call.ended",
        **settings,
    }
    env = relay_env(f"sqlite:///{tmp_path}/outbox.sqlite3", **values)
    done = run_relay("aircall", "webhooks", *args, env=env)
    for secret in SECRETS:
        assert secret not in done.stdout and secret not in done.stderr
    return done


def test_every_label_active_exits_0_and_shows_what_is_not_subscribed(
    fake: FakeAircall, tmp_path: Path
) -> None:
    fake.add_webhook(RELAY_URL, MAIN_TOKEN, custom_name="Relay main")
    fake.add_webhook(RELAY_URL, SECOND_TOKEN, events=["call.created", "call.ended"])
    fake.add_webhook("https://zapier.example/hook", OTHER_TOKEN, active=False)
    done = run(fake, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "Aircall webhooks: 3, of which 2 of this relay"
    main = next(line for line in lines if line.startswith("main "))
    assert "active" in main and RELAY_URL in main and "Relay main" in main
    assert main.rstrip().endswith("none")
    second = next(line for line in lines if line.startswith("second "))
    assert second.rstrip().endswith("call.hungup")
    other = next(line for line in lines if line.startswith("- "))
    assert "INACTIVE" in other and "not this relay's" in other
    assert lines[-1] == "Every label has an active webhook: main, second."


def test_an_inactive_webhook_exits_3_and_reactivate_keeps_its_events(
    fake: FakeAircall, tmp_path: Path
) -> None:
    fake.add_webhook(RELAY_URL, MAIN_TOKEN)
    events = ["call.created", "call.hungup", "call.ended", "call.tagged"]
    second = fake.add_webhook(RELAY_URL, SECOND_TOKEN, events=events, active=False)
    other = fake.add_webhook("https://zapier.example/hook", OTHER_TOKEN, active=False)
    before = run(fake, tmp_path)
    assert before.returncode == 3, before.stderr
    assert "label second: no active webhook; its webhook is inactive" in before.stdout
    assert "--reactivate" in before.stdout

    fixed = run(fake, tmp_path, "--reactivate")
    assert fixed.returncode == 0, fixed.stderr
    assert (
        f"reactivated webhook {second['webhook_id']} (label second, {RELAY_URL}), its 4 events "
        "kept as they were" in fixed.stdout
    )
    by_id = {hook["webhook_id"]: hook for hook in fake.webhooks()}
    assert by_id[second["webhook_id"]]["active"] is True
    assert by_id[second["webhook_id"]]["events"] == events  # a PUT without them resets to all
    assert by_id[other["webhook_id"]]["active"] is False  # not the relay's: left alone
    puts = [target for method, target, _ in fake.requests() if method == "PUT"]
    assert puts == [f"/v1/webhooks/{second['webhook_id']}"]

    again = run(fake, tmp_path, "--reactivate")
    assert again.returncode == 0 and "reactivated" not in again.stdout


def test_a_reactivation_that_fails_exits_1_saying_what_was_done(
    fake: FakeAircall, tmp_path: Path
) -> None:
    first = fake.add_webhook(RELAY_URL, MAIN_TOKEN, events=["call.ended"], active=False)
    fake.add_webhook(RELAY_URL, SECOND_TOKEN, active=False)
    fake.fail_next(1, body=b"<html>oops</html>", after=2)  # the listing, the first PUT, then this
    done = run(fake, tmp_path, "--reactivate")
    assert done.returncode == 1
    assert f"reactivated webhook {first['webhook_id']} (label main" in done.stderr
    assert "PUT /v1/webhooks/" in done.stderr and "not JSON" in done.stderr
    assert [hook["active"] for hook in fake.webhooks()] == [True, False]


def test_a_label_no_webhook_carries_exits_3_and_json_says_so(
    fake: FakeAircall, tmp_path: Path
) -> None:
    main = fake.add_webhook(RELAY_URL, MAIN_TOKEN, events=["call.ended"])
    done = run(fake, tmp_path, "--json")
    assert done.returncode == 3, done.stderr
    report = json.loads(done.stdout)
    assert report["labels"] == {
        "main": {"active": True, "webhooks": [main["webhook_id"]]},
        "second": {"active": False, "webhooks": []},
    }
    assert report["labels_without_active_webhook"] == ["second"]
    [hook] = report["webhooks"]
    assert hook["missing_forwarded_events"] == ["call.created", "call.hungup"]
    assert "token" not in hook
    text = run(fake, tmp_path)
    assert "label second: no active webhook; no webhook of Aircall carries its token" in text.stdout


def test_wrong_credentials_exit_2_with_a_clear_message(fake: FakeAircall, tmp_path: Path) -> None:
    done = run(fake, tmp_path, aircall_api_token="a-wrong-api-token-000000")
    assert done.returncode == 2
    assert "Aircall refused the credentials (403)" in done.stderr
    assert "RELAY_AIRCALL_API_TOKEN" in done.stderr
    assert "a-wrong-api-token-000000" not in done.stderr + done.stdout
    assert fake.request_count() == 1


def test_without_the_api_settings_exit_2_naming_them(fake: FakeAircall, tmp_path: Path) -> None:
    done = run(fake, tmp_path, aircall_api_id="", aircall_api_token="")
    assert done.returncode == 2
    assert "RELAY_AIRCALL_API_ID and RELAY_AIRCALL_API_TOKEN: not set" in done.stderr
    no_tokens = run(fake, tmp_path, aircall_tokens="")
    assert no_tokens.returncode == 2 and "RELAY_AIRCALL_TOKENS" in no_tokens.stderr
    assert fake.request_count() == 0


def test_garbage_from_the_api_exits_1(fake: FakeAircall, tmp_path: Path) -> None:
    fake.fail_next(1, body=b"<html>maintenance</html>")
    done = run(fake, tmp_path)
    assert done.returncode == 1
    assert "Aircall's Public API failed: GET /v1/webhooks (page 1): the answer is not JSON" in (
        done.stderr
    )
    assert done.stdout == ""


def test_5xx_past_the_retries_exits_1(fake: FakeAircall, tmp_path: Path) -> None:
    """Four retries, 1 + 2 + 4 + 8 s apart: this test takes 15 s."""
    fake.fail_next(5, status=502)
    done = run(fake, tmp_path)
    assert done.returncode == 1
    assert "answered 502" in done.stderr and "5 times in a row" in done.stderr
    assert fake.request_count() == 5


def test_the_fake_aircall_command_serves_what_it_was_given(tmp_path: Path) -> None:
    fake = RelayProcess(
        "fake-aircall",
        "--api-id",
        API_ID,
        "--api-token",
        API_TOKEN,
        "--calls",
        "120",
        "--webhook",
        f"{RELAY_URL}={MAIN_TOKEN}",
        "--inactive",
        env=relay_env("sqlite://"),
    )
    try:
        deadline = time.monotonic() + 30
        while len(fake.lines) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        listening, loaded = fake.lines[:2]
        base_url = listening.removeprefix("fake-aircall listening on ")
        assert base_url.startswith("http://127.0.0.1:")
        assert loaded.startswith("webhook ") and loaded.endswith(RELAY_URL)
        calls = httpx.get(f"{base_url}/v1/calls", params={"per_page": 50}, auth=(API_ID, API_TOKEN))
        assert calls.json()["meta"]["total"] == 120
        env = relay_env(
            f"sqlite:///{tmp_path}/outbox.sqlite3",
            aircall_api_id=API_ID,
            aircall_api_token=API_TOKEN,
            aircall_api_url=base_url,
            aircall_tokens=f"main:{MAIN_TOKEN}",
        )
        done = run_relay("aircall", "webhooks", "--reactivate", env=env)
        assert done.returncode == 0, done.stderr
        assert "reactivated webhook" in done.stdout
    finally:
        fake.signal(signal.SIGTERM)
        assert fake.wait(10) == 0
