"""OpenTelemetry traces and metrics for a session, opt-in (``pip install "image-gen-async[otel]"``).

``AsyncSession(telemetry=Telemetry())`` (or ``Telemetry(tracer_provider=..., meter_provider=...)``)
records one span per job, ``image_gen.job`` (kind CLIENT), from ``submit()``/``generate()``
until its handle is done: ``gen_ai.provider.name``, ``gen_ai.request.model``,
``image_gen.task_id``, ``image_gen.polls``, ``image_gen.retries``, ``image_gen.outcome``,
``image_gen.credits_used`` and, on failure, ``error.type`` and an ERROR status; events
``create`` and ``poll`` (with the status seen). Metrics: ``image_gen.creates``,
``image_gen.polls``, ``image_gen.refusals``, ``image_gen.retries`` (counters),
``image_gen.job.duration`` (histogram, s) and ``image_gen.jobs.in_flight``. No key, token or
URL query is ever put in an attribute: only provider, model and task id.

Nothing here is imported by the library itself: without a ``telemetry=`` the session
never touches OpenTelemetry, and without the extra this module is the only one that needs it.

aiohttp's own instrumentation records request URLs, and Get3W v1 sends the webhook callback
URL (with its token) in the create's query string: instrument it with ``url_filter=strip_query``.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any

from yarl import URL

try:
    from opentelemetry import metrics, trace
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError(
        'image_gen_async.otel needs the otel extra: pip install "image-gen-async[otel]"'
    ) from error

if TYPE_CHECKING:
    from ._handle import TaskHandle

__all__ = ["Telemetry", "strip_query"]

INSTRUMENTATION = "image_gen_async"


def strip_query(url: URL | str) -> str:
    """``url`` without its query and fragment: for aiohttp's instrumentation ``url_filter``."""
    parsed = URL(str(url))
    return str(parsed.with_query(None).with_fragment(None))


class Telemetry:
    """What a session reports to OpenTelemetry (see the module docstring)."""

    def __init__(self, *, tracer_provider: Any = None, meter_provider: Any = None) -> None:
        self._tracer = trace.get_tracer(INSTRUMENTATION, tracer_provider=tracer_provider)
        meter = metrics.get_meter(INSTRUMENTATION, meter_provider=meter_provider)
        self._creates = meter.create_counter(
            "image_gen.creates", unit="{create}", description="creates accepted"
        )
        self._polls = meter.create_counter(
            "image_gen.polls", unit="{poll}", description="status reads answered"
        )
        self._refusals = meter.create_counter(
            "image_gen.refusals",
            unit="{refusal}",
            description="creates refused for capacity or rate (429, 503)",
        )
        self._retries = meter.create_counter(
            "image_gen.retries", unit="{retry}", description="requests retried"
        )
        self._duration = meter.create_histogram(
            "image_gen.job.duration", unit="s", description="submit to the handle's end"
        )
        self._in_flight = meter.create_up_down_counter(
            "image_gen.jobs.in_flight", unit="{job}", description="jobs submitted and not yet done"
        )
        self._jobs: weakref.WeakKeyDictionary[TaskHandle, tuple[Any, float]] = weakref.WeakKeyDictionary()

    def job_started(self, provider: str, model: str) -> Any:
        """A job's span, from the ``submit()`` call on."""
        self._in_flight.add(1, {"gen_ai.provider.name": provider})
        return self._tracer.start_span(
            "image_gen.job",
            kind=trace.SpanKind.CLIENT,
            attributes={"gen_ai.provider.name": provider, "gen_ai.request.model": model},
        ), time.monotonic()

    def create_failed(self, started: Any, provider: str, error: BaseException) -> None:
        """The create never made a handle: the span ends here."""
        span, began = started
        self._end(span, began, provider, outcome="not_created", error=error)

    def created(self, started: Any, handle: TaskHandle, retries: int, refusals: int) -> None:
        """The create was accepted: the span follows the handle to its end."""
        span, began = started
        labels = {"gen_ai.provider.name": handle.provider}
        self._creates.add(1, labels)
        if retries:
            self._retries.add(retries, labels)
        if refusals:
            self._refusals.add(refusals, labels)
        span.set_attribute("image_gen.task_id", handle.task_id)
        span.add_event("create", {"image_gen.retries": retries, "image_gen.refusals": refusals})
        self._jobs[handle] = (span, began)
        if handle.done():
            self._finished(handle)  # a sync answer that was the result
        else:
            handle.add_done_callback(self._finished)

    def polled(self, handle: TaskHandle) -> None:
        """A poll of ``handle`` was answered."""
        self._polls.add(1, {"gen_ai.provider.name": handle.provider})
        job = self._jobs.get(handle)
        if job is not None:
            job[0].add_event("poll", {"image_gen.status": handle.status.value})

    def _finished(self, handle: TaskHandle) -> None:
        job = self._jobs.pop(handle, None)
        if job is None:
            return
        span, began = job
        span.set_attribute("image_gen.polls", handle.polls)
        span.set_attribute("image_gen.retries", handle.retries)
        if handle.credits_used is not None:
            span.set_attribute("image_gen.credits_used", handle.credits_used)
        if handle.cancelled():
            self._end(span, began, handle.provider, outcome="cancelled")
            return
        error = handle.exception()
        if error is None:
            result = handle.result()
            if result.credits_used is not None:
                span.set_attribute("image_gen.credits_used", result.credits_used)
        outcome = "completed" if error is None else "failed"
        self._end(span, began, handle.provider, outcome=outcome, error=error)

    def _end(
        self, span: Any, began: float, provider: str, *, outcome: str, error: BaseException | None = None
    ) -> None:
        labels = {"gen_ai.provider.name": provider}
        self._in_flight.add(-1, labels)
        self._duration.record(time.monotonic() - began, labels | {"image_gen.outcome": outcome})
        span.set_attribute("image_gen.outcome", outcome)
        if error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
        span.end()
