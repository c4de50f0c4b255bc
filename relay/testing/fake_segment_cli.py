"""The command line of the fake Segment server, for local trials: the options of
`aircall-relay fake-segment` (`add_cli_arguments`) and running it (`run_from_cli`).

Also runnable alone: `python -m relay.testing.fake_segment_cli --port 8765`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import timedelta

from relay.testing.fake_segment_config import FakeSegmentOptions, RateLimitConfig, SourceConfig
from relay.testing.fake_segment_faults import ChaosEntry, Fault
from relay.testing.fake_segment_server import serve_forever


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("the failure rate is between 0 and 1")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the fake server's options to `parser`."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        help="port to bind; 0 (the default) picks a free one and prints it",
    )
    parser.add_argument(
        "--write-key",
        dest="write_keys",
        action="append",
        default=[],
        metavar="KEY",
        help="a known write key (repeatable); with none, any non-empty key is known",
    )
    parser.add_argument(
        "--region",
        choices=("us", "eu"),
        default="us",
        help="the region this fake pretends to be, and that of the --write-key keys",
    )
    parser.add_argument(
        "--error-body-style",
        choices=("text", "json"),
        default="text",
        help="4xx/5xx bodies as Segment's plain 'Bad Request' (default) or as JSON",
    )
    parser.add_argument(
        "--rate-limit-rps",
        type=_positive,
        default=None,
        metavar="RPS",
        help="answer 429 past this many requests a second per workspace (default: no limit)",
    )
    parser.add_argument(
        "--rate-limit-burst",
        type=_positive,
        default=None,
        metavar="N",
        help="the rate limiter's bucket size (default: RPS)",
    )
    parser.add_argument(
        "--chaos",
        type=_probability,
        default=0.0,
        metavar="FAILURE_RATE",
        help="fail this share of requests at random, split evenly between 500, 429 and reset",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --chaos draws (default 0)")
    parser.add_argument(
        "--dedup-window-seconds",
        type=_non_negative,
        default=24 * 3600.0,
        metavar="SECONDS",
        help="how long a messageId is remembered for dedup (default 86400)",
    )
    parser.add_argument(
        "--keep-request-bodies",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep each request's decoded body in the request log (default); "
        "--no-keep-request-bodies saves memory and time in benchmarks",
    )


def chaos_table(failure_rate: float) -> list[ChaosEntry]:
    """`failure_rate` of requests fail: a third each 500, 429 (retry after 1 s), and reset."""
    if failure_rate <= 0:
        return []
    share = failure_rate / 3
    return [
        ChaosEntry(Fault.status(500), share),
        ChaosEntry(Fault.rate_limited(1), share),
        ChaosEntry(Fault.reset(), share),
    ]


def options_from_cli(args: argparse.Namespace) -> FakeSegmentOptions:
    rate_limit = None
    if args.rate_limit_rps is not None:
        rate_limit = RateLimitConfig(rps=args.rate_limit_rps, burst=args.rate_limit_burst)
    return FakeSegmentOptions(
        write_keys={key: SourceConfig(region=args.region) for key in args.write_keys},
        region=args.region,
        error_body_style=args.error_body_style,
        rate_limit=rate_limit,
        chaos=chaos_table(args.chaos),
        chaos_seed=args.seed,
        dedup_window=timedelta(seconds=args.dedup_window_seconds),
        keep_request_bodies=args.keep_request_bodies,
    )


def run_from_cli(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; 0 on a clean stop."""
    try:
        options = options_from_cli(args)
    except ValueError as error:
        print(f"fake-segment: {error}", file=sys.stderr)
        return 2
    try:
        serve_forever(args.host, args.port, options)
    except OSError as error:
        print(f"fake-segment: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fake-segment",
        description="A local fake of Segment's HTTP Tracking API, for trials and tests.",
    )
    add_cli_arguments(parser)
    return run_from_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
