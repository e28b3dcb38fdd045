"""The command line: ``image-gen-async generate | batch | demo | emulator``.

Keys come from the environment only (GET3W_API_KEY, DH3_API_KEY, NANANOBANANA_API_KEY),
never from the command line, where they would end up in shell history.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sqlite3
import sys
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.logging import RichHandler

from . import AsyncSession, ImageGenError, InvalidRequestError, PollSettings, __version__, _config
from ._progress import (
    LANE_COLUMNS,
    SUMMARY_COLUMNS,
    BatchDisplay,
    lane_row,
    make_console,
    print_table,
    summary_row,
)
from .batch import (
    DEFAULT_CONCURRENCY,
    RESERVED_KEYS,
    RESULTS_NAME,
    PauseSettings,
    count_jobs,
    read_jsonl,
    run_batch,
)
from .download import DEFAULT_MAX_BYTES
from .errors import ConfigurationError
from .models import TaskStatus
from .providers import CODECS
from .router import Target

T = TypeVar("T")

EXIT_OK = 0  # every job done
EXIT_FAILED = 1  # some job failed, is uncertain, or was left unfinished; or the account stopped it
EXIT_USAGE = 2  # bad arguments, missing key, an output directory of another batch
EXIT_STOPPED = 3  # a batch stopped early (provider unreachable, session closed); unsent jobs pending
EXIT_INTERRUPTED = 130  # Ctrl-C; rerun the same command to resume

EPILOG = """\
keys: read from GET3W_API_KEY (get3w, get3w_v3), DH3_API_KEY, NANANOBANANA_API_KEY.
exit codes: 0 every job done; 1 some job failed, is uncertain or unfinished, or the account
stopped the batch (bad key, no credits or access, --max-credits reached: fix it and rerun;
unsent jobs stay pending); 2 usage error (bad arguments, missing key, output directory of
another batch, or one whose journal cannot account for its results); 3 the batch stopped
early (provider or Redis unreachable, session closed): unsent jobs stay pending, rerun the
same command to send them;
130 interrupted (rerun the same command to resume)."""


# Provider commands repeat the keys and exit codes under their own --help.
PROVIDER_COMMAND: dict[str, Any] = {"epilog": EPILOG, "formatter_class": argparse.RawDescriptionHelpFormatter}


class UsageError(Exception):
    """A problem with how the command was called: one line on stderr, exit 2."""


def param(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; the value is read as JSON when it is JSON (``seed=7``), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def positive_int(text: str) -> int:
    """An integer of at least 1 (argparse type: its error names the flag, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}") from None
    return _checked(value, _config.whole_problem(value, 1))


def non_negative_int(text: str) -> int:
    """An integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0: ``nan``, ``inf`` and ``0`` are refused like ``-1``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}") from None
    return _checked(value, _config.number_problem(value))


def non_negative_float(text: str) -> float:
    """A finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text!r}") from None
    return _checked(value, _config.number_problem(value, low_inclusive=True))


def target(text: str) -> Target:
    """``PROVIDER:MODEL`` (split at the first colon: model ids may hold slashes)."""
    provider, sep, model = text.partition(":")
    if not sep or not model.strip():
        raise argparse.ArgumentTypeError(f"expected PROVIDER:MODEL, got {text!r}")
    try:
        return Target(provider.strip(), model.strip())
    except ConfigurationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def base_url(text: str) -> str:
    """An http(s) origin (a path prefix allowed); the message never repeats credentials."""
    return _checked(text, _config.origin_problem(text))


def _checked(value: T, problem: str | None) -> T:
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def _provider_options() -> argparse.ArgumentParser:
    """Options every command that talks to a provider takes."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("provider")
    group.add_argument("--provider", choices=list(CODECS), help="the API to use")
    group.add_argument("--model", help="the provider's model id, e.g. nano-banana-pro")
    group.add_argument(
        "--base-url",
        type=base_url,
        help="origin of the API (default: the provider's public host; with --target, of every target's)",
    )
    group.add_argument(
        "--rate", type=positive_float, help="creates per second (default: dh3 3, others unpaced)"
    )
    group.add_argument("--timeout", type=positive_float, help="seconds a job may take (default 3600)")
    group.add_argument(
        "--max-concurrent",
        type=positive_int,
        help="the most tasks the account runs at once (default: learned from the provider's refusals)",
    )
    group.add_argument(
        "--first-poll",
        type=positive_float,
        default=2.0,
        help="seconds before the first poll when the provider gives no estimate (default 2)",
    )
    group.add_argument(
        "--min-poll-interval",
        type=positive_float,
        default=0.25,
        help="shortest wait between polls (default 0.25)",
    )
    group.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = argparse.ArgumentParser(
        prog="image-gen-async",
        description="Generate images on Get3W (v1, v3), dh3 and nananobanana; run resumable batches.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    provider = _provider_options()

    generate = commands.add_parser(
        "generate",
        parents=[provider],
        help="one image: submit, wait, print the URLs, save with -o",
        **PROVIDER_COMMAND,
    )
    generate.add_argument("--prompt", required=True)
    generate.add_argument(
        "--param",
        type=param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a provider parameter, repeatable (aspect_ratio=16:9, seed=7); JSON values are decoded",
    )
    generate.add_argument("-o", "--out-dir", type=Path, help="save the outputs here")
    generate.add_argument(
        "--stream",
        action="store_true",
        help="use the provider's stream mode and show its progress (nananobanana)",
    )

    batch = commands.add_parser(
        "batch",
        parents=[provider],
        help="a JSONL file of jobs into a folder; rerun to resume",
        **PROVIDER_COMMAND,
        description='Each line of FILE is a job: {"prompt": "...", "aspect_ratio": "16:9", ...}. '
        f"Images, {RESULTS_NAME} and the journal go to DIR; rerunning on DIR resumes.",
    )
    batch.add_argument("file", type=Path, metavar="FILE.jsonl")
    batch.add_argument(
        "--target",
        type=target,
        action="append",
        default=[],
        metavar="PROVIDER:MODEL",
        help="instead of --provider/--model: route the jobs over these targets, repeatable, in order "
        "of preference (dh3:nano-banana-pro); --rate and --max-concurrent apply to each",
    )
    batch.add_argument("-o", "--out-dir", type=Path, required=True, metavar="DIR")
    batch.add_argument(
        "--concurrency",
        type=positive_int,
        default=DEFAULT_CONCURRENCY,
        help=f"jobs in flight at once (default {DEFAULT_CONCURRENCY})",
    )
    batch.add_argument("--retry-failed", action="store_true", help="run failed jobs again")
    batch.add_argument(
        "--resubmit-uncertain",
        action="store_true",
        help="send again creates that may have reached the provider (can pay twice)",
    )
    batch.add_argument("--no-download", action="store_true", help="record the URLs, save no files")
    batch.add_argument(
        "--max-bytes", type=positive_int, default=DEFAULT_MAX_BYTES, help="size cap of one output file"
    )
    batch.add_argument(
        "--max-credits",
        type=non_negative_float,
        help="start no job that could take this run past this many credits (nananobanana)",
    )
    default_pauses = PauseSettings()
    batch.add_argument(
        "--first-pause",
        type=positive_float,
        default=default_pauses.first,
        help="seconds the batch pauses when creates cannot be sent (provider or Redis unreachable, "
        f"rate limited); doubles each time up to {default_pauses.cap:g} (default {default_pauses.first:g})",
    )
    batch.add_argument(
        "--max-pauses",
        type=non_negative_int,
        default=default_pauses.max_pauses,
        help="pauses in a row before the batch stops with its unsent jobs pending "
        f"(default {default_pauses.max_pauses}; 0 stops at once)",
    )

    demo = commands.add_parser(
        "demo",
        help="all four APIs on the built-in emulator: no keys needed",
        description="Starts the emulator on loopback and runs a batch on each of the four APIs.",
    )
    demo.add_argument("--jobs", type=positive_int, default=100, help="jobs per API (default 100)")
    demo.add_argument("--duration", type=positive_float, default=1.0, help="seconds a job takes (default 1)")
    demo.add_argument("-o", "--out-dir", type=Path, help="where the images go (default: a new temp dir)")

    commands.add_parser(
        "emulator",
        add_help=False,
        help="serve the emulator (--port N; --help for its options)",
    ).add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``image-gen-async`` and ``python -m image_gen_async``; the exit code."""
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["emulator"]:
        # Its own parser owns every option after the command (--port, --dh3-qps, --help, ...).
        from .testing.__main__ import main as emulator_main

        emulator_main(arguments[1:])
        return EXIT_OK
    args = build_parser().parse_args(arguments)
    console = make_console()
    _configure_logging(getattr(args, "verbose", 0))
    try:
        if args.command == "demo":
            from .demo import run_demo

            return asyncio.run(run_demo(args.jobs, args.duration, args.out_dir, console))
        if args.command == "generate":
            return asyncio.run(_generate(args, console))
        return asyncio.run(_batch(args, console))
    except (UsageError, ConfigurationError, InvalidRequestError) as error:
        print(f"image-gen-async: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ImageGenError as error:
        print(f"image-gen-async: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, sqlite3.Error) as error:
        # The output directory or its journal: full disk, no permission, a damaged file.
        print(f"image-gen-async: cannot use the output directory: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("image-gen-async: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def _configure_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    # stderr, so logs never mix into piped output; rich keeps them above a live bar.
    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
    logger = logging.getLogger("image_gen_async")
    logger.setLevel(level)
    logger.addHandler(handler)


def _providers(args: argparse.Namespace) -> list[str]:
    """The APIs this command talks to: ``--provider``, or every ``--target``'s; usage checked."""
    targets: list[Target] = getattr(args, "target", [])
    if targets:
        if args.provider is not None or args.model is not None:
            raise UsageError("give --target, or --provider with --model, not both")
        return list(dict.fromkeys(target.provider for target in targets))
    if args.provider is None or args.model is None:
        also = " (or --target PROVIDER:MODEL)" if hasattr(args, "target") else ""
        raise UsageError(f"--provider and --model are required{also}")
    return [args.provider]


def _session(args: argparse.Namespace) -> AsyncSession:
    """A session for the providers of this command, keys from the environment."""
    names = _providers(args)

    def each(value: T | None) -> dict[str, T] | None:
        return dict.fromkeys(names, value) if value is not None else None

    return AsyncSession(
        base_urls=each(args.base_url),
        rate_limits=each(args.rate),
        polling=PollSettings(
            first_poll=args.first_poll,
            min_interval=args.min_poll_interval,
            max_interval=max(30.0, args.min_poll_interval),
        ),
        task_timeout=args.timeout or 3600.0,
        max_concurrent=each(args.max_concurrent),
    )


def _require_key(session: AsyncSession, name: str) -> None:
    """A missing key is a usage error, named by its environment variable."""
    try:
        session.client(name).check_ready()
    except ConfigurationError:
        # Not the library's message: it suggests api_keys=..., which a shell user cannot pass.
        raise UsageError(f"no API key for {name}: set {CODECS[name].env_var}") from None


async def _generate(args: argparse.Namespace, console: Console) -> int:
    """Submit one job, wait, print its URLs (and saved paths)."""
    params = dict(args.param)
    for reserved in sorted((RESERVED_KEYS | {"prompt"}) & set(params)):
        raise UsageError(f"--param {reserved}=... is not a provider parameter")
    _providers(args)
    if args.stream and not CODECS[args.provider].has_stream_mode:
        raise UsageError(f"--stream: {args.provider} has no stream mode (nananobanana has)")
    async with _session(args) as session:
        _require_key(session, args.provider)
        client = session.client(args.provider)
        handle = await client.submit(args.model, prompt=args.prompt, stream=args.stream, **params)
        # The live status, one line per change (a spinner on a terminal).
        with console.status(f"{handle.provider} task {handle.task_id}: submitted") as live:
            shown: list[str] = []

            def show(status: TaskStatus) -> None:
                done = "" if handle.progress is None or status.terminal else f" {handle.progress:.0f}%"
                line = f"{handle.provider} task {handle.task_id}: {status.value}{done}"
                if shown[-1:] == [line]:
                    return  # a status and its progress arrive together
                shown.append(line)
                live.update(line)
                if not console.is_terminal and not status.terminal:
                    console.print(line, highlight=False)

            handle.on_progress(lambda progress, message: show(handle.status))
            async for status in handle.updates():
                show(status)
        result = await handle
        console.print(f"{result.provider} task {result.task_id}: {result.status.value}", highlight=False)
        for url in result.urls:
            console.print(url, highlight=False, soft_wrap=True)
        if args.out_dir is not None:
            for path in await session.download(result, args.out_dir):
                console.print(f"saved {path}", highlight=False, soft_wrap=True)
    return EXIT_OK


async def _batch(args: argparse.Namespace, console: Console) -> int:
    """Run (or resume) a JSONL batch with a live progress bar and a summary table."""
    if not args.file.is_file():
        raise UsageError(f"{args.file}: no such file")
    total = count_jobs(args.file)
    providers = _providers(args)
    label = "router" if args.target else f"{args.provider} {args.model}"
    async with _session(args) as session:
        for name in providers:
            _require_key(session, name)
        router = session.router(args.target) if args.target else None
        with BatchDisplay(console) as display:
            options: dict[str, Any] = {
                "out_dir": args.out_dir,
                "download": not args.no_download,
                "concurrency": args.concurrency,
                "retry_failed": args.retry_failed,
                "resubmit_uncertain": args.resubmit_uncertain,
                "max_bytes": args.max_bytes,
                "total": total,
                "on_progress": display.track(label, total),
                "pauses": PauseSettings(
                    first=args.first_pause,
                    cap=max(args.first_pause, PauseSettings().cap),
                    max_pauses=args.max_pauses,
                ),
                "max_credits": args.max_credits,
            }
            jobs = read_jsonl(args.file)
            if router is not None:
                stats = await run_batch(session, router, jobs, **options)
            else:
                stats = await run_batch(session, args.provider, args.model, jobs, **options)
    if router is not None:
        print_table(console, "targets", LANE_COLUMNS, [lane_row(lane) for lane in router.stats.values()])
    print_table(console, "batch summary", SUMMARY_COLUMNS, [summary_row(label, stats)])
    console.print(f"results: {args.out_dir / RESULTS_NAME}", highlight=False, soft_wrap=True)
    if stats.uncertain:
        console.print(
            f"{stats.uncertain} job(s) uncertain: their create may have reached the provider. "
            "Check them, then rerun with --resubmit-uncertain to send them again (may pay twice).",
            highlight=False,
        )
    if stats.unfinished:
        console.print(f"{stats.unfinished} job(s) unfinished: rerun the same command to resume.")
    if stats.failed:
        console.print(f"{stats.failed} job(s) failed: see {RESULTS_NAME}; --retry-failed runs them again.")
    if stats.stopped is not None:
        # stderr too, where a script's log keeps it: the reason is not the jobs' fault.
        message = (
            f"batch stopped before its end: {stats.stopped}. {stats.pending} job(s) not sent "
            "(still pending; lines not yet read are not counted): rerun the same command to send them."
        )
        console.print(message, highlight=False, soft_wrap=True)
        print(f"image-gen-async: {message}", file=sys.stderr)
        # The account's stop (key, credits, access, the credit budget) is a failure to fix and
        # rerun (exit 1); an outage or a closed session is a stop to rerun as it is (exit 3).
        return EXIT_FAILED if stats.account_stopped else EXIT_STOPPED
    return EXIT_OK if stats.ok else EXIT_FAILED
