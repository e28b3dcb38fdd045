"""Bad configuration and bad call arguments: a typed error naming the parameter, nothing sent.

The rules are tables over ``_config``'s pure checks; the end-to-end tests count what the
emulator received (creates, polls, downloads: none) and what the caller got.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from image_gen_async import (
    AsyncSession,
    ConfigurationError,
    InvalidRequestError,
    PollSettings,
    _config,
)
from image_gen_async.cli import base_url, build_parser, positive_float, positive_int
from image_gen_async.testing import Emulator

from .conftest import CLIENTS, KEYS, MODELS, SessionFactory
from .test_cli import cli

NAN, INF = math.nan, math.inf

# --- the pure rules, as tables -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (1, None),
        (0.001, None),
        (1e9, None),
        (Fraction(1, 3), None),
        (0, "got 0"),
        (-1, "got -1"),
        (NAN, "got nan"),
        (INF, "got inf"),
        (-INF, "got -inf"),
        ("10", "got str '10'"),
        (True, "got bool True"),
        (None, "got a NoneType"),
        (b"1", "got bytes b'1'"),
        ([1], "got a list"),
    ],
)
def test_positive_number_rule(value: object, problem: str | None) -> None:
    reason = _config.number_problem(value)
    if problem is None:
        assert reason is None
    else:
        assert (
            reason is not None and reason.startswith("must be a finite number above 0") and problem in reason
        )


@pytest.mark.parametrize(
    ("value", "ok"),
    [(0, True), (0.025, True), (0.999, True), (1, False), (-0.01, False), (NAN, False), ("0.1", False)],
)
def test_number_in_range_rule(value: object, ok: bool) -> None:
    reason = _config.number_problem(value, low=0.0, low_inclusive=True, high=1.0)
    assert (reason is None) is ok
    if not ok:
        assert reason is not None and "[0, 1)" in reason


@pytest.mark.parametrize(
    ("value", "minimum", "ok"),
    [
        (0, 0, True),
        (4, 0, True),
        (10**9, 1, True),
        (-1, 0, False),
        (0, 1, False),
        (1.5, 0, False),
        (3.0, 0, False),  # a float is not a count, even a whole one
        (True, 0, False),
        ("10", 1, False),
        (None, 1, False),
    ],
)
def test_whole_number_rule(value: object, minimum: int, ok: bool) -> None:
    assert (_config.whole_problem(value, minimum) is None) is ok


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("https://api.example.test", None),
        ("http://127.0.0.1:8080", None),
        ("https://proxy.example.test/get3w/", None),  # a path prefix: a proxy may need it
        ("", "is empty"),
        ("   ", "is empty"),
        ("ftp://example.test", "scheme 'ftp'"),
        ("javascript:alert(1)", "scheme 'javascript'"),
        ("example.test", "no scheme"),
        ("https://", "no host"),
        ("https://user:hunter2@api.example.test", "credentials"),
        ("https://user@api.example.test", "credentials"),
        ("https://api.example.test/?token=hunter2", "query"),
        ("https://api.example.test/#x", "fragment"),
        ("http://[::1", "not a URL"),
        (5, "must be a str"),
        (b"https://u:hunter2@h.test", "must be a str, got a bytes"),
        (None, "must be a str"),
    ],
)
def test_origin_rule(value: object, problem: str | None) -> None:
    reason = _config.origin_problem(value)
    if problem is None:
        assert reason is None
    else:
        assert reason is not None and problem in reason
        assert "hunter2" not in reason


SECRET = "sk-live-hunter2-0123456789"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("sk-été-0123", "non-ASCII"),
        ("sk-\u200b0123", "non-ASCII"),
        ("sk one", "spaces or control"),
        ("sk\x00one", "spaces or control"),
        ("sk\tone", "spaces or control"),
    ],
)
def test_key_rule_never_quotes_the_key(value: str, problem: str) -> None:
    reason = _config.key_problem(value)
    assert reason is not None and problem in reason
    with pytest.raises(ConfigurationError) as caught:
        _config.api_key("api_keys['dh3']", value)
    assert "api_keys['dh3']" in str(caught.value) and value not in str(caught.value)


def test_retry_cap_below_retry_base_is_refused() -> None:
    assert _config.retry_bounds(0.5, 0.5) == (0.5, 0.5)
    with pytest.raises(ConfigurationError, match=r"retry_cap \(0.1\) must be at least retry_base \(0.5\)"):
        _config.retry_bounds(0.5, 0.1)


# --- the session refuses bad settings at construction ----------------------------------------

BAD_SETTINGS: list[tuple[dict[str, Any], str]] = [
    ({"task_timeout": 0}, "task_timeout"),
    ({"task_timeout": -5}, "task_timeout"),
    ({"task_timeout": INF}, "task_timeout"),
    ({"task_timeout": "3600"}, "task_timeout"),
    ({"read_timeout": -1}, "read_timeout"),
    ({"read_timeout": NAN}, "read_timeout"),
    ({"connect_timeout": 0}, "connect_timeout"),
    ({"connect_timeout": True}, "connect_timeout"),
    ({"sync_timeout": INF}, "sync_timeout"),
    ({"create_retries": -1}, "create_retries"),
    ({"create_retries": 1.5}, "create_retries"),
    ({"create_retries": True}, "create_retries"),
    ({"create_retries": None}, "create_retries"),
    ({"poll_retries": -1}, "poll_retries"),
    ({"poll_retries": 2.0}, "poll_retries"),
    ({"poll_retries": False}, "poll_retries"),
    ({"retry_base": NAN}, "retry_base"),
    ({"retry_base": 0}, "retry_base"),
    ({"retry_cap": INF}, "retry_cap"),
    ({"retry_base": 2.0, "retry_cap": 1.0}, "retry_cap"),
    ({"rate_limit_margin": -0.1}, "rate_limit_margin"),
    ({"rate_limit_margin": 1.0}, "rate_limit_margin"),
    ({"rate_limit_margin": NAN}, "rate_limit_margin"),
    ({"pool_size": "10"}, "pool_size"),
    ({"pool_size": None}, "pool_size"),
    ({"pool_size": 0}, "pool_size"),
    ({"pool_size": True}, "pool_size"),
    ({"rate_limits": {"dh3": NAN}}, r"rate_limits\['dh3'\]"),
    ({"rate_limits": {"dh3": INF}}, r"rate_limits\['dh3'\]"),
    ({"rate_limits": {"dh3": "3"}}, r"rate_limits\['dh3'\]"),
    ({"rate_limits": {"dh3": True}}, r"rate_limits\['dh3'\]"),
    ({"rate_limits": {"dh3": 0}}, r"rate_limits\['dh3'\]"),
    ({"rate_limits": {"dh3": -2}}, r"rate_limits\['dh3'\]"),
    ({"rate_limits": [("dh3", 3)]}, "rate_limits must be a mapping"),
    ({"api_keys": {"dh3": 12345}}, r"api_keys\['dh3'\] must be a str, got a int"),
    ({"api_keys": {"dh3": b"sk-bytes"}}, r"api_keys\['dh3'\] must be a str, got a bytes"),
    ({"api_keys": {"dh3": None}}, r"api_keys\['dh3'\] must be a str"),
    ({"api_keys": {"dh3": "  "}}, r"api_keys\['dh3'\] is empty"),
    ({"api_keys": {"dh4": "x"}}, "unknown client 'dh4'"),
    ({"base_urls": {"dh3": ""}}, r"base_urls\['dh3'\] is empty"),
    ({"base_urls": {"dh3": "ftp://example.test"}}, r"base_urls\['dh3'\] must be an http\(s\) URL"),
    ({"base_urls": {"dh3": None}}, r"base_urls\['dh3'\] must be a str"),
    ({"webhook_secrets": {"get3w_v3": ""}}, r"webhook_secrets\['get3w_v3'\] is empty"),
    ({"webhook_secrets": {"get3w_v3": b"whsec"}}, r"webhook_secrets\['get3w_v3'\] must be a str"),
    ({"webhook_secrets": {"nope": "whsec"}}, "webhook_secrets: unknown client 'nope'"),
    ({"polling": PollSettings(history=0)}, "polling.history"),
    ({"polling": PollSettings(max_interval=INF)}, "polling.max_interval"),
    ({"polling": PollSettings(webhook_grace=-1)}, "polling.webhook_grace"),
    ({"polling": PollSettings(webhook_unknown_wait=NAN)}, "polling.webhook_unknown_wait"),
    ({"polling": {"first_poll": 1}}, "polling must be a PollSettings"),
]


@pytest.mark.parametrize(("settings", "named"), BAD_SETTINGS)
def test_bad_settings_are_refused_naming_the_parameter(settings: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        AsyncSession(env={}, **settings)


@pytest.mark.parametrize(
    "settings",
    [
        {"rate_limits": {"dh3": None, "get3w": 5, "nananobanana": 0.5}},
        {"poll_retries": None, "create_retries": 0, "retry_base": 0.01, "retry_cap": 0.01},
        {"rate_limit_margin": 0.0, "pool_size": 1},
        {"base_urls": {"get3w": "https://proxy.example.test/get3w/"}},
        {"api_keys": {"dh3": "sk-abc\n"}, "webhook_secrets": {"get3w_v3": "whsec_x"}},
    ],
)
def test_good_settings_are_taken(settings: dict[str, Any]) -> None:
    AsyncSession(env={}, **settings)


def test_a_path_prefix_in_base_urls_is_kept_for_every_request() -> None:
    session = AsyncSession(env={}, base_urls={"get3w": "https://proxy.example.test/get3w/"})
    assert str(session.get3w_v3._target.url("/api/v3/x")) == "https://proxy.example.test/get3w/api/v3/x"


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ("https://admin:hunter2@api.example.test", "credentials"),
        ("ftp://admin:hunter2@api.example.test", "scheme 'ftp'"),
        ("https://api.example.test/?key=hunter2", "query"),
    ],
)
def test_base_url_messages_never_repeat_credentials(value: str, where: str) -> None:
    with pytest.raises(ConfigurationError, match=where) as caught:
        AsyncSession(env={}, base_urls={"dh3": value})
    assert "hunter2" not in str(caught.value) and "admin" not in str(caught.value)


@pytest.mark.parametrize(
    ("key", "problem"),
    [("sk-ünïcode-" + SECRET, "non-ASCII"), (SECRET + " x", "spaces"), (SECRET + "\x7f", "control")],
)
def test_key_messages_never_repeat_the_key(key: str, problem: str) -> None:
    for options, source in (
        ({"api_keys": {"dh3": key}, "env": {}}, "api_keys['dh3']"),
        ({"env": {"DH3_API_KEY": key}}, "DH3_API_KEY"),
        ({"api_keys": {"get3w": key}, "env": {}}, "api_keys['get3w']"),
    ):
        with pytest.raises(ConfigurationError, match=problem) as caught:
            AsyncSession(**options)
        message = str(caught.value)
        assert source in message and SECRET not in message and "hunter2" not in message


def test_a_key_passed_where_the_mapping_belongs_is_not_repeated() -> None:
    with pytest.raises(ConfigurationError, match="api_keys must be a mapping") as caught:
        AsyncSession(env={}, api_keys=SECRET)  # type: ignore[arg-type]
    assert SECRET not in str(caught.value)
    with pytest.raises(ConfigurationError, match="webhook_secrets must be a mapping") as caught:
        AsyncSession(env={}, webhook_secrets=SECRET)  # type: ignore[arg-type]
    assert SECRET not in str(caught.value)


def test_a_borrowed_key_is_checked_once_and_shared() -> None:
    session = AsyncSession(env={"GET3W_API_KEY": "sk-env"}, api_keys={"get3w": " sk-given\n"})
    assert session.get3w._target.secret == session.get3w_v3._target.secret == "sk-given"


def test_environment_values_that_are_empty_mean_no_key() -> None:
    session = AsyncSession(env={"DH3_API_KEY": "  ", "GET3W_WEBHOOK_SECRET": ""})
    assert session.dh3._target.key is None


# --- per call: refused before the create (or poll, or download) is sent ----------------------

BAD_TIMEOUTS: list[object] = [-1, 0, NAN, INF, -INF, "10", True, [5]]


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS)
async def test_submit_with_a_bad_timeout_sends_nothing(
    session: AsyncSession, emulator: Emulator, timeout: object
) -> None:
    for name in CLIENTS:
        with pytest.raises(InvalidRequestError, match="timeout"):
            await session.client(name).submit(MODELS[name], prompt="a fox", timeout=timeout)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="timeout"):
            await session.client(name).generate(MODELS[name], prompt="a fox", timeout=timeout)  # type: ignore[arg-type]
    assert sum(emulator.stats.create_requests.values()) == 0
    assert emulator.requests == []


@pytest.mark.parametrize(
    "url", [5, b"https://hooks.example/cb", "not a url", "ftp://hooks.example/cb", "/cb", "https://"]
)
async def test_a_bad_webhook_url_sends_nothing(
    session: AsyncSession, emulator: Emulator, url: object
) -> None:
    for name in ("get3w", "get3w_v3", "dh3"):
        with pytest.raises(InvalidRequestError, match="webhook_url"):
            await session.client(name).submit(MODELS[name], prompt="a fox", webhook_url=url)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="webhook_url"):
            await session.client(name).generate(MODELS[name], prompt="a fox", webhook_url=url)  # type: ignore[arg-type]
    assert sum(emulator.stats.create_requests.values()) == 0


async def test_nananobanana_params_cannot_replace_the_calls_model(
    session: AsyncSession, emulator: Emulator
) -> None:
    with pytest.raises(InvalidRequestError, match="selectedModel"):
        await session.nananobanana.submit(MODELS["nananobanana"], prompt="a fox", selectedModel="another")
    assert sum(emulator.stats.create_requests.values()) == 0


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"timeout": -1}, "timeout"),
        ({"timeout": NAN}, "timeout"),
        ({"timeout": "10"}, "timeout"),
        ({"estimated_duration": NAN}, "estimated_duration"),
        ({"estimated_duration": -3}, "estimated_duration"),
    ],
)
async def test_resume_with_bad_arguments_polls_nothing(
    session: AsyncSession, emulator: Emulator, arguments: dict[str, Any], named: str
) -> None:
    with pytest.raises(InvalidRequestError, match=named):
        session.dh3.resume("t-123", MODELS["dh3"], **arguments)
    with pytest.raises(InvalidRequestError, match="task_id"):
        session.dh3.resume("", MODELS["dh3"])
    await session.close()  # would end a handle that had been started, polls and all
    assert emulator.requests == []


async def test_a_good_timeout_still_works(session: AsyncSession, emulator: Emulator) -> None:
    handle = await session.dh3.submit(MODELS["dh3"], prompt="a fox", timeout=5)
    assert (await handle).urls
    assert emulator.stats.creates["dh3"] == 1


@pytest.mark.parametrize("max_bytes", [0, -1, 1.5, "10", True, None])
async def test_download_with_a_bad_max_bytes_fetches_nothing(
    session: AsyncSession, emulator: Emulator, tmp_path: Path, max_bytes: object
) -> None:
    result = await session.dh3.generate(MODELS["dh3"], prompt="a fox")
    emulator.reset_stats()
    with pytest.raises(InvalidRequestError, match="max_bytes"):
        await session.download(result, tmp_path, max_bytes=max_bytes)  # type: ignore[arg-type]
    assert emulator.requests == []
    assert not any(tmp_path.iterdir())  # noqa: ASYNC240 - a tmp dir listing, not I/O worth a thread


# --- a server that fails every create: bad retry settings never reach it ---------------------


@pytest.fixture
async def failing_server() -> AsyncIterator[tuple[str, list[int]]]:
    """Answers every request 503; counts them."""
    seen: list[int] = []

    async def refuse(request: web.Request) -> web.Response:
        seen.append(1)
        return web.json_response({"code": 503, "message": "busy"}, status=503)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


@pytest.mark.parametrize(
    "settings",
    [{"create_retries": -1}, {"create_retries": 1.5}, {"retry_base": NAN}, {"retry_cap": NAN}],
)
async def test_retry_settings_that_would_never_stop_are_refused(
    make_session: SessionFactory, failing_server: tuple[str, list[int]], settings: dict[str, Any]
) -> None:
    url, seen = failing_server
    with pytest.raises(ConfigurationError, match=next(iter(settings))):
        make_session(base_urls={"dh3": url}, **settings)
    assert seen == []


# --- the command line: argparse errors (exit 2) naming the flag -------------------------------


@pytest.mark.parametrize(
    ("check", "text", "ok"),
    [
        (positive_float, "2.5", True),
        (positive_float, "nan", False),
        (positive_float, "inf", False),
        (positive_float, "0", False),
        (positive_float, "-1", False),
        (positive_float, "ten", False),
        (positive_int, "8", True),
        (positive_int, "0", False),
        (positive_int, "1.5", False),
        (positive_int, "", False),
        (base_url, "http://127.0.0.1:9", True),
        (base_url, "", False),
        (base_url, "https://u:hunter2@h.test", False),
        (base_url, "file:///etc/passwd", False),
    ],
)
def test_cli_value_types(check: Any, text: str, ok: bool) -> None:
    if ok:
        check(text)
        return
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        check(text)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--timeout", "nan"),
        ("--timeout", "0"),
        ("--rate", "inf"),
        ("--rate", "-3"),
        ("--first-poll", "nan"),
        ("--min-poll-interval", "0"),
        ("--base-url", ""),
        ("--base-url", "https://u:hunter2@h.test"),
    ],
)
def test_cli_flags_give_argparse_errors(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(
            ["generate", "--provider", "dh3", "--model", "m", "--prompt", "p", f"{flag}={value}"]
        )
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and "hunter2" not in err


@pytest.mark.parametrize(("flag", "value"), [("--max-bytes", "0"), ("--concurrency", "1.5")])
def test_cli_batch_flags_give_argparse_errors(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(
            ["batch", "jobs.jsonl", "-o", "out", "--provider", "dh3", "--model", "m", flag, value]
        )
    assert caught.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


async def test_cli_bad_timeout_and_bad_key_send_nothing(emulator: Emulator) -> None:
    base = (
        "generate",
        "--provider",
        "dh3",
        "--model",
        MODELS["dh3"],
        "--prompt",
        "p",
        "--base-url",
        emulator.url,
    )
    code, _, stderr = await cli(*base, "--timeout", "nan")
    assert code == 2 and "argument --timeout" in stderr
    key = "sk-ünïcode-" + KEYS["dh3"]
    code, _, stderr = await cli(*base, keys={"DH3_API_KEY": key})
    assert code == 2 and "DH3_API_KEY" in stderr and "non-ASCII" in stderr
    assert KEYS["dh3"] not in stderr and "Traceback" not in stderr
    assert emulator.requests == []
