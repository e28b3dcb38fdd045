"""Shared pieces of the router tests: the three targets of one model and sessions on the emulator."""

from __future__ import annotations

from collections import Counter
from typing import Any

from image_gen_async import AsyncSession, Target
from image_gen_async.testing import Emulator, EmulatorProcess

from .conftest import FAST

# Nano Banana Pro under each provider's name (nananobanana sells the Nano Banana family).
DH3 = Target("dh3", "nano-banana-pro")
GET3W = Target("get3w", "google/nano-banana-pro/text-to-image")
NANA = Target("nananobanana", "nano-banana")
THREE = [GET3W, DH3, NANA]


def session_on(
    *emulators: Emulator | EmulatorProcess, keys: dict[str, Any] | None = None, **overrides: Any
) -> AsyncSession:
    """A session with every client on the first emulator (or per client: ``base_urls``), fast retries."""
    options: dict[str, Any] = {
        "api_keys": keys or {"get3w": "sk-get3w", "dh3": "sk-dh3", "nananobanana": "sk-nana"},
        "base_urls": dict.fromkeys(("get3w", "get3w_v3", "dh3", "nananobanana"), emulators[0].url),
        "rate_limits": {"dh3": None},
        **FAST,
    } | overrides
    return AsyncSession(**options)


def opened(sessions: list[AsyncSession], *emulators: Emulator, **options: Any) -> AsyncSession:
    """``session_on(...)``, closed after the test by the ``sessions`` fixture."""
    session = session_on(*emulators, **options)
    sessions.append(session)
    return session


def prompts_created(*emulators: Emulator) -> Counter[str]:
    """How many tasks each prompt made, over every provider of every emulator."""
    tasks = [task for emu in emulators for task in emu.tasks.values()]
    return Counter(task.input.get("prompt") or _nested_prompt(task.input) for task in tasks)


def _nested_prompt(body: dict[str, Any]) -> str:
    """dh3 nests its input under ``<model>_input``."""
    for value in body.values():
        if isinstance(value, dict) and "prompt" in value:
            return str(value["prompt"])
    return ""
