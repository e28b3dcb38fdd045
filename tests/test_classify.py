"""The decisions, as tables: what is accepted, retried, uncertain or final, and the retry budget."""

from __future__ import annotations

import asyncio
from typing import Any

import backoff
import pytest

from image_gen_async import ProtocolError, ServerError, TransportError
from image_gen_async._classify import Failure, Verdict, classify_create, classify_download, classify_poll
from image_gen_async._retry import Retry, RetryBudget, next_wait, retrying
from image_gen_async.providers import CODECS, ErrorReport

A, R, U, F, X = Verdict.ACCEPTED, Verdict.RETRY, Verdict.UNCERTAIN, Verdict.FAILED, Verdict.REFUSED

# (sent, http status, error status the codec read, names a task, failure) -> verdict
CREATE_TABLE: list[tuple[bool, int | None, int | None, bool, Failure | None, Verdict]] = [
    # No answer: unsent is safe to repeat, sent is not; TLS never mends.
    (False, None, None, False, Failure.NO_ANSWER, R),
    (True, None, None, False, Failure.NO_ANSWER, U),
    (False, None, None, False, Failure.TLS, F),
    (True, None, None, False, Failure.TOO_LARGE, U),
    # Success.
    (True, 200, None, False, None, A),
    (True, 201, None, False, None, A),
    # A success that cannot be read may have made a task.
    (True, 200, None, False, Failure.NOT_JSON, U),
    (True, 200, None, False, Failure.BAD_SHAPE, U),
    (True, 200, None, True, Failure.BAD_SHAPE, U),
    # Redirects are not followed and made nothing.
    (True, 301, None, False, None, F),
    (True, 307, None, False, None, F),
    # HTTP 5xx: 503 naming no task is "busy, nothing made"; any other 5xx may have made it,
    # whatever its body's code says.
    (True, 503, 503, False, None, X),
    (True, 503, None, False, Failure.NOT_JSON, X),
    (True, 503, 503, True, None, U),
    (True, 503, 500, False, None, U),  # a 503 whose body says "server error" may have made it
    (True, 500, 500, False, None, U),
    (True, 500, 503, False, None, U),
    (True, 500, 429, False, None, U),
    (True, 502, 502, False, None, U),
    (True, 504, None, False, Failure.NOT_JSON, U),
    # 429 and client errors.
    (True, 429, 429, False, None, X),
    (True, 429, 429, True, None, U),
    (True, 400, 400, False, None, F),
    (True, 401, 401, False, None, F),
    (True, 402, 402, False, None, F),
    (True, 403, 403, False, None, F),
    (True, 404, 404, False, None, F),
    (True, 400, 429, False, None, X),  # a rate-limit message under 400
    (True, 400, 400, True, None, U),  # an error that names a task
    # Errors in the body under HTTP 200 (dh3): the body's code decides.
    (True, 200, 429, False, None, X),
    (True, 200, 503, False, None, X),
    (True, 200, 500, False, None, U),
    (True, 200, 400, False, None, F),
    (True, 200, 402, False, None, F),
    (True, 200, 400, True, None, U),
]


@pytest.mark.parametrize(("sent", "status", "error_status", "names_task", "failure", "verdict"), CREATE_TABLE)
def test_create_table(
    sent: bool,
    status: int | None,
    error_status: int | None,
    names_task: bool,
    failure: Failure | None,
    verdict: Verdict,
) -> None:
    assert (
        classify_create(
            sent=sent, http_status=status, error_status=error_status, names_task=names_task, failure=failure
        )
        is verdict
    )


def test_no_unsent_create_is_ever_uncertain_and_no_sent_5xx_but_503_is_retried() -> None:
    """Two rules over every combination the codecs can produce."""
    statuses = [None, 200, 201, 301, 400, 401, 402, 403, 404, 408, 422, 429, 500, 502, 503, 504]
    for status in statuses:
        for error_status in [None, 400, 401, 402, 403, 404, 429, 500, 502, 503]:
            for names_task in (False, True):
                for failure in [None, *Failure]:
                    verdict = classify_create(
                        sent=True,
                        http_status=status,
                        error_status=error_status,
                        names_task=names_task,
                        failure=failure,
                    )
                    if status is not None and status >= 500 and status != 503:
                        assert verdict not in (R, X), (status, error_status, names_task, failure)
                    if status == 503 and error_status is not None and error_status not in (429, 503):
                        assert verdict is U, (error_status, names_task, failure)
                    if verdict is X:
                        assert not names_task and (status in (429, 503) or error_status in (429, 503))
                    if names_task and (error_status is not None or failure is not None) and status:
                        assert verdict in (U, F), (status, error_status, failure)
    for failure in (Failure.NO_ANSWER, Failure.TLS):
        assert classify_create(sent=False, http_status=None, failure=failure) is not U


POLL_TABLE: list[tuple[int | None, int | None, Failure | None, Verdict]] = [
    (None, None, Failure.NO_ANSWER, R),
    (None, None, Failure.TLS, F),
    (None, None, Failure.TOO_LARGE, F),
    (200, None, None, A),
    (200, None, Failure.NOT_JSON, R),
    (200, None, Failure.OTHER_TASK, R),
    (200, None, Failure.BAD_SHAPE, F),
    (302, None, None, F),
    (500, 500, None, R),
    (502, None, Failure.NOT_JSON, R),
    (503, 503, None, R),
    (429, 429, None, R),
    (408, 408, None, R),
    (404, 404, None, F),
    (401, 401, None, F),
    (403, 403, None, F),
    (400, 400, None, F),
    (200, 500, None, R),  # dh3: a server error in the body
    (200, 404, None, F),
    (404, None, Failure.NOT_JSON, F),
]


@pytest.mark.parametrize(("status", "error_status", "failure", "verdict"), POLL_TABLE)
def test_poll_table(
    status: int | None, error_status: int | None, failure: Failure | None, verdict: Verdict
) -> None:
    assert classify_poll(http_status=status, error_status=error_status, failure=failure) is verdict


DOWNLOAD_TABLE: list[tuple[int | None, Failure | None, Verdict]] = [
    (200, None, A),
    (None, Failure.NO_ANSWER, R),
    (None, Failure.TLS, F),
    (None, Failure.BAD_URL, F),
    (200, Failure.TOO_LARGE, F),
    (500, None, R),
    (503, None, R),
    (429, None, R),
    (408, None, R),
    (403, None, F),
    (404, None, F),
    (410, None, F),
]


@pytest.mark.parametrize(("status", "failure", "verdict"), DOWNLOAD_TABLE)
def test_download_table(status: int | None, failure: Failure | None, verdict: Verdict) -> None:
    assert classify_download(http_status=status, failure=failure) is verdict


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize(
    ("http_status", "body", "verdict"),
    [
        (500, {"code": 503, "message": "busy"}, U),
        (500, {"code": 429, "message": "slow down"}, U),
        (503, {"code": 503, "message": "busy"}, X),
        (503, {"type": "server_busy", "error": "busy", "activeTasks": 10}, X),
        (429, {"code": 429, "message": "Rate limit exceeded"}, X),
        (402, {"error": "Insufficient credits"}, F),
        (401, {"code": 401, "message": "Invalid API key"}, F),
    ],
)
def test_every_codec_error_body_classifies_by_the_rules(
    name: str, http_status: int, body: dict[str, Any], verdict: Verdict
) -> None:
    """What each codec reads out of the documented error bodies, put through the create rules."""
    report = CODECS[name].error_of(http_status, body)
    assert isinstance(report, ErrorReport)
    names_task = CODECS[name].task_id_of(body) is not None
    got = classify_create(
        sent=True, http_status=http_status, error_status=report.status, names_task=names_task
    )
    assert got is verdict


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"task_id": "abc"}, "abc"),
        ({"task_id": 12345}, "12345"),  # not the documents' text, but it names the task
        ({"data": {"id": 7}}, "7"),
        ({"generationId": 0}, "0"),
        ({"task_id": True}, None),  # a flag, not an id
        ({"task_id": 1.5}, None),
        ({"task_id": ""}, None),
        ({"task_id": ["a"]}, None),
    ],
)
def test_task_id_of_reads_text_and_whole_numbers(name: str, body: dict[str, Any], named: str | None) -> None:
    assert CODECS[name].task_id_of(body) == named


def test_task_id_of_does_not_recurse_without_end() -> None:
    deep: dict[str, Any] = {"data": {}}
    node = deep["data"]
    for _ in range(5000):
        node["data"] = {}
        node = node["data"]
    node["id"] = "deep"
    assert CODECS["dh3"].task_id_of(deep) is None


# The retry budget.


async def test_retrying_counts_tries_and_raises_the_last_failure() -> None:
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        raise Retry(ServerError(503, message=f"busy {calls}"), retry_after=0.0)

    with pytest.raises(ServerError, match="busy 3"):
        await retrying(attempt, RetryBudget(3, 0.001, 0.002))
    assert calls == 3


async def test_retrying_gives_up_before_a_wait_that_would_pass_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        raise Retry(TransportError("refused"), retry_after=5.0)

    started = loop.time()
    with pytest.raises(TimeoutError):
        await retrying(
            attempt,
            RetryBudget(None, 0.001, 10.0),
            deadline=started + 1.0,
            past_deadline=lambda error: TimeoutError(str(error)),
        )
    assert calls == 1 and loop.time() - started < 0.5  # it did not sleep 5 s first


async def test_retrying_passes_anything_else_through_at_once() -> None:
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        raise ProtocolError("wrong shape")

    with pytest.raises(ProtocolError):
        await retrying(attempt, RetryBudget(5, 0.001, 0.002))
    assert calls == 1


async def test_retrying_returns_after_a_transient_failure() -> None:
    answers = iter([Retry(TransportError("refused")), "ok"])

    async def attempt() -> str:
        answer = next(answers)
        if isinstance(answer, Retry):
            raise answer
        return answer

    assert await retrying(attempt, RetryBudget(2, 0.001, 0.002)) == "ok"


@pytest.mark.parametrize(
    ("retry_after", "wait"),
    [
        (None, 2.0),  # no advice: the step
        (0.0, 2.0),  # "again now": still the step (asked at once, a server would see thousands)
        (1.0, 2.0),  # advice shorter than the step: the step
        (5.0, 5.0),  # longer: the advice
        (50.0, 20.0),  # longer than the cap: the cap
    ],
)
def test_the_wait_is_the_back_off_step_or_longer_advice(
    monkeypatch: pytest.MonkeyPatch, retry_after: float | None, wait: float
) -> None:
    monkeypatch.setattr(backoff, "full_jitter", lambda value: value)  # the step itself, unjittered
    assert next_wait(iter([2.0]), retry_after, 20.0) == wait
