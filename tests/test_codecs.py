"""The codecs are pure: wire formats and error bodies checked without any I/O."""

from __future__ import annotations

from typing import Any

import pytest

from image_gen_async import ProtocolError, TaskStatus
from image_gen_async.errors import api_error
from image_gen_async.models import converter, structure
from image_gen_async.providers import CODECS
from image_gen_async.providers.get3w import Get3WTask

V1 = CODECS["get3w"]
V3 = CODECS["get3w_v3"]
DH3 = CODECS["dh3"]
NANO = CODECS["nananobanana"]


def classify(codec: Any, status: int, body: Any) -> str | None:
    report = codec.error_of(status, body)
    if report is None:
        return None
    return type(api_error(report.status, report.code, report.message)).__name__


@pytest.mark.parametrize(
    ("codec", "status", "body", "expected"),
    [
        (V1, 401, {"code": 401, "error": "Invalid or revoked API key"}, "AuthenticationError"),
        (V1, 403, {"code": 403, "error": "Insufficient balance"}, "PermissionDeniedError"),
        (V1, 429, {"code": 429, "error": "Rate limit exceeded"}, "RateLimitError"),
        (V1, 500, {"code": 500, "error": "Server error"}, "ServerError"),
        (V1, 200, {"code": 400, "error": "Invalid parameters"}, "BadRequestError"),
        (V1, 200, {"id": "t", "status": "failed", "code": 500, "error": "boom"}, None),
        (V3, 400, {"code": 400, "message": "Invalid parameters", "data": None}, "BadRequestError"),
        (V3, 200, {"code": 401, "message": "Invalid API key", "data": None}, "AuthenticationError"),
        (V3, 200, {"code": 200, "message": "success", "data": {"id": "p", "status": "created"}}, None),
        (DH3, 200, {"code": 429, "message": "rate limit exceeded"}, "RateLimitError"),
        (DH3, 200, {"code": 1001, "message": "QPS limit reached"}, "RateLimitError"),
        (DH3, 200, {"code": 401, "message": "unauthorized"}, "AuthenticationError"),
        (DH3, 429, "not json", "RateLimitError"),
        (DH3, 200, {"code": 200, "message": "ok", "task_id": "t"}, None),
        (NANO, 402, {"error": "Insufficient credits"}, "PaymentRequiredError"),
        (NANO, 503, {"error": "Server is busy", "type": "server_busy", "activeTasks": 10}, "ServerError"),
        (NANO, 200, {"success": False, "error": "Missing prompt"}, "BadRequestError"),
        (NANO, 200, {"success": False, "warning": True, "generationId": "g"}, None),
    ],
)
def test_error_bodies(codec: Any, status: int, body: Any, expected: str | None) -> None:
    assert classify(codec, status, body) == expected


def test_v1_sync_answer_is_a_finished_result() -> None:
    body = {
        "id": "x",
        "model": "google/nano-banana-pro/text-to-image",
        "status": "completed",
        "code": 0,
        "outputs": ["https://storage.example.com/output.png"],
        "timings": {"queue_wait": 427, "total": 28131},
        "error": None,
        "created_at": "2026-03-28T07:50:42",
    }
    snapshot = V1.read_submit("google/nano-banana-pro/text-to-image", body)
    assert snapshot.result is not None
    assert snapshot.result.urls == ("https://storage.example.com/output.png",)
    assert snapshot.result.timings == {"queue_wait": 427.0, "total": 28131.0}


def test_v1_async_answer_carries_the_estimate() -> None:
    snapshot = V1.read_submit("m/m/t", {"id": "x", "status": "created", "estimated_duration": 52})
    assert snapshot.status is TaskStatus.QUEUED and snapshot.estimated_duration == 52.0
    assert (
        V1.read_submit(
            "m/m/t", {"id": "x", "status": "created", "estimated_duration": 1.5}
        ).estimated_duration
        == 1.5
    )


@pytest.mark.parametrize("error", [None, "", "absent"])
@pytest.mark.parametrize("nsfw", [[], None, "absent"])
def test_v3_tolerates_lookalike_deployments(error: Any, nsfw: Any) -> None:
    data: dict[str, Any] = {
        "id": "p1",
        "model": "get3w/flux-dev",
        "status": "completed",
        "outputs": ["https://o/1.png"],
    }
    if error != "absent":
        data["error"] = error
    if nsfw != "absent":
        data["has_nsfw_contents"] = nsfw
    snapshot = V3.read_poll("p1", "get3w/flux-dev", {"code": 200, "message": "success", "data": data})
    assert snapshot.result is not None and snapshot.result.ok and snapshot.result.error is None


def test_v3_nsfw_flag_marks_content_policy() -> None:
    data = {"id": "p1", "status": "failed", "error": "rejected", "has_nsfw_contents": [True]}
    snapshot = V3.read_poll("p1", "m/x", {"code": 200, "message": "success", "data": data})
    assert snapshot.result is not None and V3.content_policy(snapshot.result)


def test_dh3_output_key_fallback_and_string_numbers() -> None:
    body = {
        "code": 200,
        "message": "Ok",
        "nano_banana_output": {  # a deployment naming the key after another model spelling
            "task_id": "t",
            "status": "success",
            "images": [{"url": "https://x/r.png", "file_size": "2456789", "width": 1024, "height": "1024"}],
        },
    }
    snapshot = DH3.read_poll("t", "nano-banana-pro", body)
    assert snapshot.result is not None
    assert snapshot.result.outputs[0].file_size == 2456789 and snapshot.result.outputs[0].width == 1024


def test_dh3_bad_number_is_a_protocol_error() -> None:
    body = {
        "code": 200,
        "nano_banana_pro_output": {
            "task_id": "t",
            "status": "success",
            "images": [{"url": "u", "width": "wide"}],
        },
    }
    with pytest.raises(ProtocolError, match=r"width"):
        DH3.read_poll("t", "nano-banana-pro", body)


def test_nananobanana_poll_without_data_wrapper() -> None:
    snapshot = NANO.read_poll(
        "g",
        "nano-banana",
        {"id": "g", "processingStatus": "completed", "outputImageUrls": ["https://x/1.png"]},
    )
    assert snapshot.result is not None and snapshot.result.urls == ("https://x/1.png",)


def test_unknown_status_word_names_the_field() -> None:
    with pytest.raises(ProtocolError) as caught:
        V1.read_poll("x", "m/m/t", {"id": "x", "status": "exploded"})
    assert caught.value.field == "$.status"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "created"}, "$.id"),
        ({"id": 3, "status": "created"}, "$.id"),
        ({"id": "x", "status": "created", "estimated_duration": "52"}, "$.estimated_duration"),
        ({"id": "x", "status": "created", "estimated_duration": True}, "$.estimated_duration"),
        ({"id": "x", "status": "completed", "outputs": "https://x"}, "$.outputs"),
    ],
)
def test_strict_structure_names_the_field(body: Any, field: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        structure(body, Get3WTask, provider="get3w")
    assert caught.value.field == field


def test_converter_refuses_quiet_coercion() -> None:
    with pytest.raises(TypeError):
        converter.structure("false", bool)
    with pytest.raises(TypeError):
        converter.structure(3, str)
    with pytest.raises(TypeError):
        converter.structure(3.9, int)
