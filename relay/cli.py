"""The `aircall-relay` command: its parser, its commands and their exit codes. What the commands
run is built by the composition root (relay/compose.py).

Exit codes: 0 success; 1 a runtime failure (database unreachable, migration failed, Aircall's
API failing); 2 a usage or configuration error (the message names the setting; Aircall refusing
the API credentials); 3 the schema is not at the head this version expects (`check`, and `serve`,
`drain`, `run` at start: `relay.check`), or a label without an active Aircall webhook (`aircall
webhooks`); 4 `reconcile` found ended calls without their `call.ended` and did not back-fill them
(`relay.reconcile`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from relay import __version__, daemons
from relay.aircall_cli import add_aircall_commands, run_aircall_command
from relay.check import ROLES, NotReady, check, require_schema_at_head, unreadable_settings
from relay.compose import setup_logging, setup_logging_to_stderr
from relay.daemons import build_settings
from relay.db import DatabaseError
from relay.db.engine import describe_url, is_sqlite, sqlite_path
from relay.db.migrate import upgrade_to_head
from relay.logs import configure_logging, get_logger
from relay.outbox_cli import add_outbox_commands, run_outbox_command
from relay.reconcile import add_reconcile_command, run_reconcile
from relay.settings import DEFAULTS, Settings, SettingsError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_READY = 3

log = get_logger("relay.cli")

DESCRIPTION = """\
Relay Aircall webhooks to Segment through a durable SQL outbox.

Settings come from RELAY_* environment variables and an optional TOML file
(--config, or RELAY_CONFIG_FILE); see docs/configuration.md. Secrets (Aircall
tokens, the Segment write key) are read only from there, never from options.
"""


# ---------------------------------------------------------------------------------------------
# Commands


def command_migrate(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    setup_logging(settings)
    path = sqlite_path(settings.database_url) if is_sqlite(settings.database_url) else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    upgrade = upgrade_to_head(settings.database_url, settings.database_timeout_seconds)
    database = _describe_database(settings)
    if not upgrade.applied:
        print(f"already at head ({upgrade.head}), nothing to do (database: {database})")
        return EXIT_OK
    if upgrade.previous is None:
        done = f"created the schema at head ({upgrade.head})"
    else:
        done = f"migrated from {upgrade.previous} to head ({upgrade.head})"
    print(f"{done}: applied {', '.join(upgrade.applied)} (database: {database})")
    return EXIT_OK


def command_serve(args: argparse.Namespace) -> int:
    return daemons.serve(args)


def command_drain(args: argparse.Namespace) -> int:
    return daemons.drain(args)


def command_run(args: argparse.Namespace) -> int:
    """Everything in one process, for a laptop: receiver and drainer; one Ctrl-C stops both."""
    return daemons.run(args)


def command_outbox(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    # The command's output is on stdout (tables, JSON): logs go to stderr.
    setup_logging_to_stderr(settings)
    return run_outbox_command(args, settings)


def command_aircall(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    # The command's output is on stdout (a table, JSON): logs go to stderr.
    setup_logging_to_stderr(settings)
    return run_aircall_command(args, settings)


def command_demo(args: argparse.Namespace) -> int:
    from relay.demo import run_demo

    configure_logging("console", "warning")
    return run_demo(seed=args.seed, keep=args.keep)


def command_fake_segment(args: argparse.Namespace) -> int:
    # Imported here: only the commands that serve a fake load relay.testing.
    from relay.testing.fake_segment_server import run_from_cli

    return run_from_cli(args)


def command_fake_aircall(args: argparse.Namespace) -> int:
    from relay.testing.fake_aircall import run_from_cli

    return run_from_cli(args)


def command_reconcile(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    settings.require_aircall_api()  # else exit 2, the message naming the settings
    # The report is on stdout, the progress and the logs on stderr.
    setup_logging_to_stderr(settings)
    asyncio.run(require_schema_at_head(settings))
    return run_reconcile(args, settings)


def command_check(args: argparse.Namespace) -> int:
    try:
        settings = build_settings(args)
    except SettingsError as error:
        if not args.json:
            raise  # the usual message on stderr, exit 2
        report = unreadable_settings(args.role, error)
    else:
        # The report is on stdout: logs (libraries' warnings) go to stderr.
        setup_logging_to_stderr(settings)
        report = asyncio.run(check(settings, args.role))
    print(json.dumps(report.as_json()) if args.json else report.as_text())
    return report.exit_code


def _describe_database(settings: Settings) -> str:
    return describe_url(settings.database_url)


# ---------------------------------------------------------------------------------------------
# Parser


def _failure_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("the failure rate is between 0 and 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aircall-relay",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config", metavar="FILE", help="TOML settings file (default: $RELAY_CONFIG_FILE)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_server_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--host", help=f"address to listen on (RELAY_HOST, default {DEFAULTS.host})"
        )
        command.add_argument(
            "--port",
            type=int,
            help=f"port to listen on, 0 for any free one (RELAY_PORT, default {DEFAULTS.port})",
        )
        command.add_argument(
            "--tls-certfile", metavar="PEM", help="serve HTTPS with this certificate"
        )
        command.add_argument("--tls-keyfile", metavar="PEM", help="private key of the certificate")

    serve = commands.add_parser("serve", help="run the receiver (Aircall webhooks into the outbox)")
    add_server_options(serve)
    serve.add_argument(
        "--workers",
        type=int,
        help=f"receiver processes (RELAY_WORKERS, default {DEFAULTS.workers})",
    )
    serve.set_defaults(handler=command_serve)

    run = commands.add_parser("run", help="receiver and drainer in one process, for a laptop")
    add_server_options(run)
    run.set_defaults(handler=command_run)

    drain = commands.add_parser(
        "drain", help="run the drainer (the outbox to Segment); needs RELAY_SEGMENT_WRITE_KEY"
    )
    drain.add_argument(
        "--once",
        action="store_true",
        help="deliver what is deliverable now, print a JSON summary, and exit",
    )
    drain.set_defaults(handler=command_drain)

    fake = commands.add_parser(
        "fake-segment",
        help="a local fake of Segment's HTTP API, for trials (keeps what it accepts in memory)",
    )
    fake.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    fake.add_argument(
        "--port", type=int, default=0, help="port to bind; 0 (the default) picks a free one"
    )
    fake.add_argument(
        "--write-key",
        dest="write_keys",
        action="append",
        default=[],
        metavar="KEY",
        help="a known write key (repeatable); with none, any non-empty key is known",
    )
    fake.add_argument(
        "--chaos",
        type=_failure_rate,
        default=0.0,
        metavar="FAILURE_RATE",
        help="fail this share of requests at random, a third each with 500, 429 and a reset",
    )
    fake.add_argument("--seed", type=int, default=0, help="seed of the --chaos draws (default 0)")
    fake.add_argument(
        "--keep-request-bodies",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep each request's body in the request log (default); --no-keep-request-bodies "
        "saves memory and time in benchmarks",
    )
    fake.set_defaults(handler=command_fake_segment)

    fake_aircall = commands.add_parser(
        "fake-aircall",
        help="a local fake of Aircall's Public API (calls, webhooks, its rate limit), for trials",
    )
    fake_aircall.add_argument("--host", default="127.0.0.1", help="address to bind")
    fake_aircall.add_argument(
        "--port", type=int, default=0, help="port to bind; 0 (the default) picks a free one"
    )
    fake_aircall.add_argument("--api-id", required=True, help="the API id it accepts")
    fake_aircall.add_argument(
        "--api-token",
        required=True,
        help="the API token it accepts (a made-up one: this is a fake)",
    )
    fake_aircall.add_argument(
        "--requests-per-minute",
        type=int,
        default=60,
        metavar="N",
        help="answer 429 past N requests a minute, like Aircall (default 60; 0: no limit)",
    )
    fake_aircall.add_argument(
        "--calls",
        type=int,
        default=0,
        metavar="N",
        help="load N calls built from the call.ended sample, one a minute until now",
    )
    fake_aircall.add_argument(
        "--webhook",
        dest="webhooks",
        action="append",
        default=[],
        metavar="URL=TOKEN",
        help="load a webhook to URL whose token is TOKEN, subscribed to every event (repeatable)",
    )
    fake_aircall.add_argument(
        "--inactive",
        action="store_true",
        help="load the webhooks inactive, as if Aircall had disabled them",
    )
    fake_aircall.set_defaults(handler=command_fake_aircall)

    demo = commands.add_parser(
        "demo",
        help="a first run: relay and fake Segment on free ports, the sample call posted shuffled",
    )
    demo.add_argument("--seed", type=int, help="seed of the shuffle (default: random)")
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary folder with the outbox, and print how to look at it",
    )
    demo.set_defaults(handler=command_demo)

    add_outbox_commands(commands)
    commands.choices["outbox"].set_defaults(handler=command_outbox)

    add_aircall_commands(commands)
    commands.choices["aircall"].set_defaults(handler=command_aircall)
    add_reconcile_command(commands).set_defaults(handler=command_reconcile)

    migrate = commands.add_parser("migrate", help="create or upgrade the outbox schema")
    migrate.set_defaults(handler=command_migrate)

    check_command = commands.add_parser(
        "check",
        help="check what a role needs (settings, database, schema); exit 2 for a setting, 1 for "
        "the database, 3 for the schema",
    )
    check_command.add_argument(
        "--role",
        choices=ROLES,
        default="all",
        help="what to check for: the receiver (`serve`), the drainer (`drain`), or all (default)",
    )
    check_command.add_argument("--json", action="store_true", help="print JSON")
    check_command.set_defaults(handler=command_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except SettingsError as error:
        print(f"aircall-relay: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except NotReady as error:  # before `serve`, `drain` or `run` listened or claimed
        print(f"aircall-relay: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:  # the output was piped into `head` or the like
        return EXIT_OK
    except (DatabaseError, OSError) as error:
        print(f"aircall-relay: database error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    return code


if __name__ == "__main__":
    sys.exit(main())
