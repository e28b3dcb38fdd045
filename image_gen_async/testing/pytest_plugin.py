"""A pytest plugin: test your own code against the emulator, no network, no wiring.

Installed with the package (a ``pytest11`` entry point), so nothing needs registering:

- ``image_gen_emulator``: a running ``Emulator`` (an ``EmulatorConfig`` built from the test's
  ``image_gen`` marker; jobs take 0.05 s by default, dh3 has no QPS limit);
- ``image_gen_session``: an ``AsyncSession`` with every client pointed at it, test keys, and
  polling scaled to the emulator's job duration; closed after the test;
- ``@pytest.mark.image_gen(duration=..., failure_rate=..., faults=..., dh3_qps=..., **config)``:
  any ``EmulatorConfig`` field for one test (``faults`` may be a dict of ``Faults`` fields).

The fixtures are async: they need pytest-asyncio (auto or strict mode). Without it, using
them fails with a message saying so; importing the plugin never fails.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from .._polling import PollSettings
from .._session import AsyncSession
from ..providers import CODECS
from ._emulator import Emulator
from ._state import EmulatorConfig, Faults

MARKER = "image_gen"
DEFAULT_DURATION = 0.05
TEST_KEYS: Mapping[str, str] = {name: f"test-key-{name}" for name in CODECS}

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - exercised only where pytest-asyncio is absent
    HAS_PYTEST_ASYNCIO = False
else:
    HAS_PYTEST_ASYNCIO = True


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker, so ``--strict-markers`` suites accept it."""
    config.addinivalue_line(
        "markers",
        f"{MARKER}(duration=..., failure_rate=..., faults=..., dh3_qps=..., **config): "
        "configure the image_gen_async emulator for this test",
    )


def emulator_config(node: pytest.Item | None) -> EmulatorConfig:
    """The test's ``EmulatorConfig``: the defaults, then its ``image_gen`` marker's fields."""
    fields: dict[str, Any] = {"duration": DEFAULT_DURATION, "dh3_qps": None}
    marker = node.get_closest_marker(MARKER) if node is not None else None
    if marker is not None:
        if marker.args:
            raise pytest.UsageError(f"@pytest.mark.{MARKER} takes keyword arguments only")
        fields.update(marker.kwargs)
    faults = fields.get("faults")
    if isinstance(faults, Mapping):
        fields["faults"] = Faults(**faults)
    known = {field.name for field in dataclasses.fields(EmulatorConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        settings = ", ".join(sorted(known))
        raise pytest.UsageError(
            f"@pytest.mark.{MARKER}: unknown setting {unknown[0]!r}; EmulatorConfig has {settings}"
        )
    return EmulatorConfig(**fields)


def polling_for(duration: float) -> PollSettings:
    """Polls on the emulator's clock: a first look at a quarter of a job, a tenth of it apart at least."""
    return PollSettings(
        first_poll=duration / 4,
        min_interval=max(duration / 20, 0.001),
        max_interval=max(duration, 0.01),
        webhook_grace=duration,
        webhook_unknown_wait=max(10 * duration, 0.5),
    )


def session_for(emulator: Emulator, **options: Any) -> AsyncSession:
    """An ``AsyncSession`` on ``emulator``: every client, test keys, scaled polling and retries."""
    duration = emulator.config.duration or DEFAULT_DURATION
    settings: dict[str, Any] = {
        "api_keys": dict(TEST_KEYS),
        "base_urls": dict.fromkeys(CODECS, emulator.url),
        "rate_limits": {"dh3": emulator.config.dh3_qps},
        "polling": polling_for(duration),
        "retry_base": max(duration / 10, 0.001),
        "retry_cap": max(duration, 0.01),
        "task_timeout": max(200 * duration, 10.0),
    } | options
    return AsyncSession(**settings)


def _needs_pytest_asyncio(*_: Any, **__: Any) -> Any:
    raise pytest.UsageError(
        "the image_gen_emulator and image_gen_session fixtures are async: install pytest-asyncio"
    )


if HAS_PYTEST_ASYNCIO:

    @pytest_asyncio.fixture
    async def image_gen_emulator(request: pytest.FixtureRequest) -> AsyncIterator[Emulator]:
        """A running emulator of all four APIs, configured by the test's ``image_gen`` marker."""
        async with Emulator(emulator_config(request.node)) as emulator:
            yield emulator

    @pytest_asyncio.fixture
    async def image_gen_session(image_gen_emulator: Emulator) -> AsyncIterator[AsyncSession]:
        """An ``AsyncSession`` with every client on ``image_gen_emulator``; closed after the test."""
        async with session_for(image_gen_emulator) as session:
            yield session

else:  # pragma: no cover
    image_gen_emulator = pytest.fixture(name="image_gen_emulator")(_needs_pytest_asyncio)
    image_gen_session = pytest.fixture(name="image_gen_session")(_needs_pytest_asyncio)
