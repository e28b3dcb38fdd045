"""The command line as a user runs it, against the emulator on loopback.

Most tests call ``main(argv)`` in-process (in a thread, as it runs its own event loop) with the
environment, stdout and stderr of a child process; the tests that kill a batch, and one smoke
test of the console script and ``python -m``, start real child processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import aiohttp.web

from image_gen_async.cli import main
from image_gen_async.testing import Emulator, EmulatorConfig

from .batch_helpers import names, results, state_counts
from .conftest import KEYS, MODELS

DH3 = MODELS["dh3"]
KEY_ENV = {"GET3W_API_KEY": KEYS["get3w"], "DH3_API_KEY": KEYS["dh3"]}
FAST = ("--first-poll", "0.02", "--min-poll-interval", "0.005")


def environment(keys: dict[str, str]) -> dict[str, str]:
    """This process's environment with no provider key but ``keys``, and no terminal size (a
    test runner's COLUMNS would narrow the tables the tests read)."""
    dropped = ("COLUMNS", "LINES")
    kept = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k not in dropped}
    return kept | keys


async def start(*args: str, keys: dict[str, str] = KEY_ENV) -> asyncio.subprocess.Process:
    """``python -m image_gen_async ARGS`` as a child process, for the tests that kill it."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "image_gen_async",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment(keys),
    )


async def cli(*args: str, keys: dict[str, str] = KEY_ENV) -> tuple[int, str, str]:
    """Run ``image-gen-async ARGS`` to its end in-process: exit code, stdout, stderr."""
    return await asyncio.wait_for(asyncio.to_thread(_run_main, list(args), keys), 60)


# One in-process run at a time: the environment, sys.stdout and sys.stderr are the process's.
_MAIN_LOCK = threading.Lock()


def _run_main(argv: list[str], keys: dict[str, str]) -> tuple[int, str, str]:
    """``main(argv)`` with the environment ``keys`` gives and its own stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with (
        _MAIN_LOCK,
        _environ(environment(keys)),
        _logger_restored(),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse: usage errors and --help
            code = exit.code if isinstance(exit.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` is ``values`` inside, as a child process's would be; restored after."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _logger_restored() -> Iterator[None]:
    """``main`` configures the library's logger as a process would; undo it for the next test."""
    logger = logging.getLogger("image_gen_async")
    handlers, level = list(logger.handlers), logger.level
    try:
        yield
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)


def write_jobs(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


async def test_batch_command_runs_reports_and_resumes(emulator: Emulator, tmp_path: Path) -> None:
    source = write_jobs(tmp_path / "jobs.jsonl", [f"fox {i}" for i in range(11)] + ["fox [fail]"])
    out = tmp_path / "out"
    args = ("batch", str(source), "--provider", "dh3", "--model", DH3, "-o", str(out), "--rate", "500")
    code, stdout, stderr = await cli(*args, "--base-url", emulator.url, *FAST)
    assert code == 1, stderr  # one job failed
    assert "batch summary" in stdout and "12/12 finished" in stdout and "--retry-failed" in stdout
    lines = results(out)
    assert sorted(r["status"] for r in lines) == ["done"] * 11 + ["failed"]
    assert len(names(out)) == 11

    code, stdout, _ = await cli(*args, "--base-url", emulator.url, *FAST)
    assert code == 1 and emulator.stats.creates["dh3"] == 12 and len(results(out)) == 12

    ok = write_jobs(tmp_path / "ok.jsonl", ["a cat", "a dog"])
    code, _, stderr = await cli(
        "batch", str(ok), "--provider", "get3w", "--model", MODELS["get3w"], "-o", str(tmp_path / "ok"),
        "--base-url", emulator.url, "--concurrency", "1", *FAST,
    )  # fmt: skip
    assert code == 0, stderr


async def test_generate_prints_the_result_and_saves_it(emulator: Emulator, tmp_path: Path) -> None:
    generate = ("generate", "--provider", "dh3", "--model", DH3, "--base-url", emulator.url, *FAST)
    params = ("--param", "aspect_ratio=16:9", "--param", "seed=7")
    code, stdout, stderr = await cli(*generate, "--prompt", "a red fox", *params, "-o", str(tmp_path))
    assert code == 0, stderr
    (name,) = names(tmp_path)
    assert f"saved {tmp_path / name}" in stdout and "completed" in stdout
    (task,) = emulator.tasks.values()
    # The live status, a line per change when stdout is not a terminal, then the result.
    assert stdout.index(f"dh3 task {task.id}: queued") < stdout.index(f"dh3 task {task.id}: completed")
    assert task.input["nano_banana_pro_input"]["seed"] == 7  # JSON values are decoded

    code, stdout, stderr = await cli(*generate, "--prompt", "x [fail]")
    assert code == 1 and "TaskFailedError" in stderr and len(stderr.strip().splitlines()) == 1


async def test_the_console_script_and_python_m_run_as_child_processes() -> None:
    """The one smoke test of real child processes: the installed script and ``python -m``."""
    # The README's first set-up command runs the script from the venv's bin directory.
    script = Path(sys.executable).parent / "image-gen-async"
    version = await asyncio.create_subprocess_exec(str(script), "--version", stdout=asyncio.subprocess.PIPE)
    emulator = await start("emulator", "--port", "0", "--duration", "0.01")
    try:
        out, _ = await asyncio.wait_for(version.communicate(), 30)
        assert version.returncode == 0 and out.startswith(b"image-gen-async ")
        assert emulator.stdout is not None
        line = (await asyncio.wait_for(emulator.stdout.readline(), 30)).decode()
        url = line.split(" serving on ")[1].split()[0]
        async with aiohttp.ClientSession() as http, http.get(f"{url}/_emulator/stats") as answer:
            assert answer.status == 200
    finally:
        emulator.terminate()
        await emulator.wait()


async def test_a_missing_key_is_one_line_and_exit_2(tmp_path: Path) -> None:
    source = write_jobs(tmp_path / "jobs.jsonl", ["a fox"])
    code, _, stderr = await cli(
        "batch", str(source), "--provider", "dh3", "--model", DH3, "-o", str(tmp_path / "o"), keys={}
    )
    assert code == 2 and stderr.strip() == "image-gen-async: error: no API key for dh3: set DH3_API_KEY"
    assert not (tmp_path / "o").exists()


async def test_usage_errors_exit_2_and_help_documents_the_codes(tmp_path: Path) -> None:
    usage = [
        (),
        ("generate", "--provider", "nope", "--model", "m", "--prompt", "p"),
        ("generate", "--provider", "dh3", "--model", DH3, "--prompt", "p", "--param", "novalue"),
        ("batch", str(tmp_path / "missing.jsonl"), "--provider", "dh3", "--model", DH3, "-o", str(tmp_path)),
        ("batch", str(tmp_path), "--provider", "dh3", "--model", DH3, "-o", "o", "--concurrency", "0"),
    ]
    outcomes = [await cli(*args) for args in (*usage, ("--help",), ("batch", "--help"))]
    for args, (code, _, stderr) in zip(usage, outcomes, strict=False):
        assert code == 2, args
        assert "Traceback" not in stderr
    code, stdout, _ = outcomes[-2]
    assert code == 0 and "exit codes" in stdout and "DH3_API_KEY" in stdout
    code, stdout, _ = outcomes[-1]
    assert code == 0 and "--resubmit-uncertain" in stdout and "--api-key" not in stdout


async def test_demo_needs_no_keys_and_writes_pngs(tmp_path: Path) -> None:
    demo = ("demo", "--jobs", "20", "--duration", "0.05", "-o", str(tmp_path))
    code, stdout, stderr = await cli(*demo, keys={})
    assert code == 0, stderr
    assert "demo summary" in stdout and "every job created exactly once" in stdout
    assert "router targets" in stdout and "dh3:nano-banana-pro#" in stdout
    for name in (*MODELS, "router"):
        done = [r for r in results(tmp_path / name) if r["status"] == "done"]
        assert len(names(tmp_path / name)) == len(done) > 0
    routes = {r["route"].split(":")[0] for r in results(tmp_path / "router")}
    assert routes == {"dh3", "get3w", "nananobanana"}  # the routed batch filled all three
    code, _, stderr = await cli("demo", "-o", str(tmp_path), keys={})
    assert code == 2 and "earlier demo" in stderr


async def kill_at_progress(process: asyncio.subprocess.Process, out: Path, progress: int) -> None:
    """SIGKILL the batch once ``progress`` jobs have a task id, at a moment with no create in flight.

    The child is frozen (SIGSTOP) while the journal is read, so what is read is exactly
    what the kill leaves. A moment with a ``creating`` row is skipped: a kill there
    leaves an uncertain job by design (tested on its own in test_batch), and this test
    is about never paying twice when everything can be resumed.
    """
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, "the batch made no progress"
        assert process.returncode is None, "the batch ended before it was killed"
        counts = state_counts(out)
        if counts.get("submitted", 0) + counts.get("downloading", 0) + counts.get("done", 0) >= progress:
            process.send_signal(signal.SIGSTOP)
            if not state_counts(out).get("creating"):
                process.kill()
                await process.wait()
                return
            process.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.002)  # the next look at the journal, not a wait for an event


async def test_batch_killed_three_times_pays_each_job_once(tmp_path: Path) -> None:
    lines = 60
    source = write_jobs(tmp_path / "jobs.jsonl", [f"a fox, take {i}" for i in range(lines)])
    out = tmp_path / "out"
    seed = random.randrange(1 << 30)
    thresholds = sorted(random.Random(seed).sample(range(8, lines - 8), 3))
    # The batch is the child process killed; the emulator can live in this one.
    config = EmulatorConfig(
        duration=0.1, duration_spread=0.5, dh3_qps=100, api_keys={"dh3": KEYS["dh3"]}, record_requests=False
    )
    async with Emulator(config) as emulator:
        args = (
            "batch", str(source), "--provider", "dh3", "--model", DH3, "-o", str(out),
            "--base-url", emulator.url, "--rate", "80", "--concurrency", "32",
            "--first-poll", "0.05", "--min-poll-interval", "0.01",
        )  # fmt: skip
        for progress in thresholds:
            await kill_at_progress(await start(*args), out, progress)
        code, stdout, stderr = await cli(*args)
        stats = emulator.stats
    context = f"seed {seed}, kills at {thresholds}"
    assert code == 0, f"{context}: {stdout}\n{stderr}"
    assert stats.creates["dh3"] == lines, context
    # Every create request beyond the creates was a 429, and each of those was retried.
    assert stats.create_requests["dh3"] == lines + stats.rate_limited.get("dh3", 0), context
    records = results(out)
    assert sorted(r["line"] for r in records) == list(range(1, lines + 1)), context
    assert {r["status"] for r in records} == {"done"}
    files = names(out)
    assert files == sorted(f for r in records for f in r["files"]) and len(set(files)) == lines, context
    assert not names(out, "*.part"), context


async def test_a_batch_killed_during_a_create_reports_it_uncertain_and_never_resends(tmp_path: Path) -> None:
    """SIGKILL while a create is on the wire: the rerun must not guess, and must not pay again."""
    creates = 0
    answered = asyncio.Event()

    async def create(request: aiohttp.web.Request) -> aiohttp.web.Response:
        nonlocal creates
        creates += 1
        await answered.wait()  # the create hangs until the test is over: the kill comes first
        return aiohttp.web.json_response({"code": 200, "message": "ok", "task_id": "t1"})

    app = aiohttp.web.Application()
    app.router.add_post("/api/v1/task/create", create)
    runner = aiohttp.web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        source = write_jobs(tmp_path / "jobs.jsonl", ["a fox in the snow"])
        out = tmp_path / "out"
        args = ("batch", str(source), "--provider", "dh3", "--model", DH3, "-o", str(out), "--base-url", url)
        process = await start(*args, *FAST)
        deadline = time.monotonic() + 30
        while not (creates and state_counts(out).get("creating")):
            assert time.monotonic() < deadline and process.returncode is None
            await asyncio.sleep(0.01)  # the next look at the journal, not a wait for an event
        process.kill()
        await process.wait()
        code, stdout, stderr = await cli(*args, *FAST)
        assert code == 1, stdout + stderr
        assert "uncertain" in (stdout + stderr).lower()
        assert creates == 1  # reported, not resent
        assert state_counts(out) == {"uncertain": 1}
    finally:
        answered.set()
        await runner.cleanup()


async def test_a_batch_whose_key_is_refused_stops_with_exit_1_and_resumes(
    emulator: Emulator, tmp_path: Path
) -> None:
    """Not the jobs' fault: none is recorded failed, all stay pending, and the exit code says so."""
    source = write_jobs(tmp_path / "jobs.jsonl", [f"a fox, take {i}" for i in range(6)])
    out = tmp_path / "out"
    args = ("batch", str(source), "--provider", "dh3", "--model", DH3, "-o", str(out), "--rate", "500", *FAST)
    wrong = {"DH3_API_KEY": "sk-revoked-key-0000000000"}
    code, stdout, stderr = await cli(*args, "--base-url", emulator.url, keys=wrong)
    assert code == 1, stdout + stderr  # the account stopped it: fix the key, then rerun
    assert "batch stopped before its end" in stderr and "AuthenticationError" in stderr
    assert "not sent" in stderr and "rerun the same command" in stderr
    assert set(state_counts(out)) == {"pending"} and not (out / "results.jsonl").read_text()
    assert emulator.stats.creates["dh3"] == 0

    code, stdout, stderr = await cli(*args, "--base-url", emulator.url)
    assert code == 0, stdout + stderr
    assert emulator.stats.creates["dh3"] == 6
