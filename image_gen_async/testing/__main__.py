"""Run the emulator on its own: `python -m image_gen_async.testing --port 8080`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from ._emulator import Emulator
from ._limits import account_problem, credits_problem, retry_after_problem
from ._process import serve_until_stopped
from ._state import EmulatorConfig


def optional_float(text: str) -> float | None:
    """A float, or None for "none" (no limit)."""
    return None if text.lower() == "none" else float(text)


def image_size(text: str) -> tuple[int, int]:
    """Parse WIDTHxHEIGHT."""
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def api_key(text: str) -> tuple[str, str]:
    """Parse PROVIDER=KEY."""
    provider, sep, key = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected PROVIDER=KEY")
    return provider, key


def checked(problem: str | None) -> None:
    """Turn a check's problem into an argparse error (which names the flag, not the value)."""
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)


def whole(text: str) -> int:
    """An integer, or an argparse error that does not repeat the text."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected an integer") from None


def max_concurrent(text: str) -> tuple[str, int]:
    """Parse ACCOUNT=N, a cap of N >= 1 unfinished tasks per key."""
    account, sep, number = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError("expected ACCOUNT=N, e.g. nananobanana=10")
    checked(account_problem(account))
    cap = whole(number)
    if cap < 1:
        raise argparse.ArgumentTypeError("the cap must be at least 1")
    return account, cap


def balance(text: str) -> tuple[str, int]:
    """Parse KEY=N, a Get3W key's creates left (N >= 0)."""
    key, sep, number = text.rpartition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected KEY=N")
    units = whole(number)
    if units < 0:
        raise argparse.ArgumentTypeError("the balance must be an integer >= 0")
    return key, units


def credits(text: str) -> int:
    """nananobanana's starting credits (an integer >= 0)."""
    value = whole(text)
    checked(credits_problem(value))
    return value


def retry_after(text: str) -> float:
    """Seconds of Retry-After on capacity refusals (a number >= 0)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number of seconds") from None
    checked(retry_after_problem(value))
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: where to listen and the main EmulatorConfig knobs."""
    parser = argparse.ArgumentParser(prog="python -m image_gen_async.testing", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--duration", type=float, default=2.0, help="mean job seconds")
    parser.add_argument("--duration-spread", type=float, default=0.0)
    parser.add_argument("--estimate-bias", type=float, default=1.0)
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--dh3-qps", type=optional_float, default=3.0, help='float or "none"')
    parser.add_argument("--dh3-errors-under-http-200", action="store_true")
    parser.add_argument("--api-key", type=api_key, action="append", default=[], metavar="PROVIDER=KEY")
    parser.add_argument("--image-size", type=image_size, default=(64, 64), metavar="WxH")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="do not keep a request log")
    limits = parser.add_argument_group("account limits (none by default)")
    limits.add_argument(
        "--max-concurrent",
        type=max_concurrent,
        action="append",
        default=[],
        metavar="ACCOUNT=N",
        help="unfinished tasks per key (accounts: get3w = v1 and v3 together, dh3, nananobanana)",
    )
    limits.add_argument("--credits", type=credits, default=1_000_000, help="nananobanana credits")
    limits.add_argument(
        "--get3w-balance",
        type=balance,
        action="append",
        default=[],
        metavar="KEY=N",
        help="creates left for this Get3W key (others unlimited)",
    )
    limits.add_argument(
        "--capacity-retry-after", type=retry_after, metavar="SECONDS", help="Retry-After on capacity refusals"
    )
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> EmulatorConfig:
    """Build the EmulatorConfig the arguments describe."""
    return EmulatorConfig(
        duration=args.duration,
        duration_spread=args.duration_spread,
        estimate_bias=args.estimate_bias,
        failure_rate=args.failure_rate,
        dh3_qps=args.dh3_qps,
        dh3_errors_under_http_200=args.dh3_errors_under_http_200,
        api_keys=dict(args.api_key) or None,
        image_size=args.image_size,
        seed=args.seed,
        record_requests=not args.no_record,
        max_concurrent=dict(args.max_concurrent),
        credits=args.credits,
        get3w_balance=dict(args.get3w_balance),
        capacity_retry_after=args.capacity_retry_after,
    )


async def serve(args: argparse.Namespace) -> None:
    """Serve until Ctrl-C or SIGTERM, then close cleanly."""
    await serve_until_stopped(Emulator(config_from(args)), args.host, args.port)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
