"""The systemd units: hardened (exposure 2.0 or less), valid, ordered after the migration, and
their example environment file holds only real settings."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess

import pytest

from relay.settings import load_settings
from tests.support import ROOT

SYSTEMD = ROOT / "systemd"
SERVICES = ["aircall-relay-receiver.service", "aircall-relay-drainer.service"]
RECONCILE = "aircall-relay-reconcile.service"
ALL_UNITS = [
    *SERVICES,
    "aircall-relay-migrate.service",
    "aircall-relay.target",
    RECONCILE,
    "aircall-relay-reconcile.timer",
]
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(SYSTEMD / name)
    return parser


@needs_analyze
@pytest.mark.parametrize("name", [*SERVICES, "aircall-relay-migrate.service", RECONCILE])
def test_exposure_is_at_most_two(name: str) -> None:
    result = subprocess.run(
        [ANALYZE or "", "security", "--offline=yes", str(SYSTEMD / name)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


@needs_analyze
def test_verify_has_nothing_to_say_but_the_missing_executable() -> None:
    result = subprocess.run(
        [ANALYZE or "", "verify", *(str(SYSTEMD / name) for name in ALL_UNITS)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    unexpected = [line for line in lines if "is not executable" not in line]
    assert unexpected == []


def test_services_start_after_a_successful_migration() -> None:
    migrate = unit("aircall-relay-migrate.service")
    assert migrate["Service"]["Type"] == "oneshot"
    assert migrate["Service"]["RemainAfterExit"] == "yes"
    assert migrate["Service"]["ExecStart"].endswith("aircall-relay migrate")
    for name, command in zip(SERVICES, ("serve", "drain"), strict=True):
        service = unit(name)
        assert "aircall-relay-migrate.service" in service["Unit"]["Requires"]
        assert "aircall-relay-migrate.service" in service["Unit"]["After"]
        assert service["Service"]["ExecStart"].endswith(f"aircall-relay {command}")
        assert service["Service"]["EnvironmentFile"] == "/etc/aircall-relay/relay.env"
        assert service["Service"]["StateDirectory"] == "aircall-relay"
        assert service["Service"]["User"] == "aircall-relay"
        assert service["Service"]["RestartPreventExitStatus"] == "2"


def test_reconcile_runs_hourly_over_26_hours_with_backfill_after_the_migration() -> None:
    timer = unit("aircall-relay-reconcile.timer")
    assert timer["Timer"]["OnCalendar"] == "hourly"
    assert timer["Timer"]["Unit"] == RECONCILE
    assert timer["Install"]["WantedBy"] == "timers.target"
    service = unit(RECONCILE)
    assert service["Service"]["Type"] == "oneshot"
    command = service["Service"]["ExecStart"].split()
    assert command[0].endswith("/aircall-relay")
    assert command[1:] == ["reconcile", "--since", "26h", "--backfill"]
    assert "aircall-relay-migrate.service" in service["Unit"]["Requires"]
    assert "aircall-relay-migrate.service" in service["Unit"]["After"]
    assert service["Service"]["EnvironmentFile"] == "/etc/aircall-relay/relay.env"
    assert service["Service"]["User"] == "aircall-relay"
    assert service["Service"]["CapabilityBoundingSet"] == ""


def test_only_the_receiver_may_bind_low_ports() -> None:
    receiver = unit("aircall-relay-receiver.service")["Service"]
    assert receiver["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert receiver["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    drainer = unit("aircall-relay-drainer.service")["Service"]
    assert drainer["AmbientCapabilities"] == ""
    assert drainer["CapabilityBoundingSet"] == ""


def test_stop_timeout_exceeds_the_default_grace_period() -> None:
    grace = load_settings({}).shutdown_grace_seconds
    for name in SERVICES:
        assert float(unit(name)["Service"]["TimeoutStopSec"]) > grace


def test_example_environment_file_holds_valid_settings() -> None:
    environ: dict[str, str] = {}
    for line in (SYSTEMD / "relay.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            environ[name] = value
    environ["RELAY_TLS_CERTFILE"] = environ["RELAY_TLS_KEYFILE"] = ""  # files of the target VM
    settings = load_settings(environ)  # raises on any unknown or invalid setting
    assert settings.database_url.endswith("/var/lib/aircall-relay/outbox.sqlite3")
    assert settings.port == 443
    assert settings.segment_write_key is not None
