"""OpenTelemetry: one span per job and the metrics, read back with the SDK's in-memory exporters."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from yarl import URL

from image_gen_async import SubmitUncertainError, TaskFailedError
from image_gen_async.otel import Telemetry, strip_query
from image_gen_async.testing import Emulator

from .conftest import KEYS, MODELS, SessionFactory


@pytest.fixture
def exporters() -> tuple[InMemorySpanExporter, InMemoryMetricReader, Telemetry]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(
        tracer_provider=tracer_provider, meter_provider=MeterProvider(metric_readers=[reader])
    )
    return spans, reader, telemetry


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: list(metric.data.data_points)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


async def test_one_span_per_job_and_the_metrics(
    make_session: SessionFactory, emulator: Emulator, exporters: Any
) -> None:
    spans, reader, telemetry = exporters
    emulator.script("dh3", "poll", "500")  # one poll retried
    session = make_session(telemetry=telemetry)
    handles = await asyncio.gather(*(session.dh3.submit(MODELS["dh3"], prompt=f"fox {i}") for i in range(3)))
    await asyncio.gather(*handles)
    with pytest.raises(TaskFailedError):
        await session.nananobanana.generate(MODELS["nananobanana"], prompt="a fox [fail]")
    finished = spans.get_finished_spans()
    assert len(finished) == 4 and {span.name for span in finished} == {"image_gen.job"}
    dh3 = [span for span in finished if span.attributes["gen_ai.provider.name"] == "dh3"]
    assert {span.attributes["image_gen.task_id"] for span in dh3} == {h.task_id for h in handles}
    for span, handle in zip(
        sorted(dh3, key=lambda s: s.attributes["image_gen.task_id"]),
        sorted(handles, key=lambda h: h.task_id),
        strict=True,
    ):
        assert span.kind is SpanKind.CLIENT
        assert span.attributes["gen_ai.request.model"] == MODELS["dh3"]
        assert span.attributes["image_gen.outcome"] == "completed"
        assert span.attributes["image_gen.polls"] == handle.polls
        assert [event.name for event in span.events].count("poll") == handle.polls
        assert span.events[0].name == "create"
    (failed,) = [span for span in finished if span.attributes["gen_ai.provider.name"] == "nananobanana"]
    assert (
        failed.status.status_code is StatusCode.ERROR and failed.attributes["error.type"] == "TaskFailedError"
    )
    assert failed.attributes["image_gen.credits_used"] == 1
    points = metric_points(reader)
    assert sum(p.value for p in points["image_gen.creates"]) == 4
    assert sum(p.value for p in points["image_gen.polls"]) == sum(h.polls for h in handles)
    assert sum(p.value for p in points["image_gen.jobs.in_flight"]) == 0
    assert sum(p.count for p in points["image_gen.job.duration"]) == 4


async def test_a_refused_create_is_counted_and_a_create_that_fails_ends_its_span(
    make_session: SessionFactory, emulator: Emulator, exporters: Any
) -> None:
    spans, reader, telemetry = exporters
    emulator.script("dh3", "create", "429")
    session = make_session(telemetry=telemetry)
    assert (await (await session.dh3.submit(MODELS["dh3"], prompt="a fox"))).ok
    emulator.script("dh3", "create", "500")
    with pytest.raises(SubmitUncertainError):
        await session.dh3.submit(MODELS["dh3"], prompt="a fox")
    outcomes = sorted(span.attributes["image_gen.outcome"] for span in spans.get_finished_spans())
    assert outcomes == ["completed", "not_created"]
    assert sum(p.value for p in metric_points(reader)["image_gen.refusals"]) == 1


async def test_no_secret_reaches_a_span_or_a_metric(
    make_session: SessionFactory, emulator: Emulator, exporters: Any
) -> None:
    spans, reader, telemetry = exporters
    session = make_session(telemetry=telemetry)
    await session.webhooks.listen("127.0.0.1", 0)
    for name in ("get3w", "get3w_v3", "dh3"):
        await (await session.client(name).submit(MODELS[name], prompt="a fox", webhook=True))
    token = session.webhooks.url_for("dh3").rsplit("/", 1)[1]
    text = repr(
        [(span.attributes, [e.attributes for e in span.events]) for span in spans.get_finished_spans()]
    )
    text += repr(reader.get_metrics_data().to_json())
    assert all(key not in text for key in KEYS.values()) and token not in text and "?" not in text


def test_the_url_filter_strips_get3w_v1s_callback_token() -> None:
    url = URL(
        "https://api.get3w.com/v1/google/nano-banana-pro/text-to-image?webhook=https%3A%2F%2Fh.example%2Fget3w%2Fs3cr3t#x"
    )
    assert strip_query(url) == "https://api.get3w.com/v1/google/nano-banana-pro/text-to-image"
    assert strip_query("https://api.get3w.com/v1/requests/abc") == "https://api.get3w.com/v1/requests/abc"


def test_without_telemetry_nothing_of_opentelemetry_is_imported() -> None:
    code = (
        "import sys, image_gen_async, image_gen_async.batch, image_gen_async.cli;"
        "from image_gen_async import AsyncSession; AsyncSession();"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
