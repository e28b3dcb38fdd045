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


def test_dh3_informational_fields_are_read_best_effort() -> None:
    images = [
        {"url": "https://x/1.png", "width": "wide", "height": "", "file_size": "2.3MB"},
        {"url": "https://x/2.png", "width": 1024.0, "height": "768", "file_size": 10},
    ]
    body = {"code": 200, "nano_banana_pro_output": {"task_id": "t", "status": "success", "images": images}}
    snapshot = DH3.read_poll("t", "nano-banana-pro", body)
    assert snapshot.result is not None and snapshot.result.ok
    first, second = snapshot.result.outputs
    assert (first.width, first.height, first.file_size) == (None, None, None)
    assert (second.width, second.height, second.file_size) == (1024, 768, 10)


def test_dh3_protocol_error_is_rooted_at_the_output_key() -> None:
    body = {
        "code": 200,
        "nano_banana_pro_output": {"task_id": "t", "status": "success", "images": [{"url": 5}]},
    }
    with pytest.raises(ProtocolError) as caught:
        DH3.read_poll("t", "nano-banana-pro", body)
    assert caught.value.field == "$.nano_banana_pro_output.images[0].url"


@pytest.mark.parametrize("code", [200, "200", 0, 201])
def test_dh3_success_codes(code: Any) -> None:
    assert DH3.error_of(200, {"code": code, "message": "ok", "task_id": "t"}) is None
    assert DH3.read_submit("nano-banana-pro", {"code": code, "task_id": "t"}).task_id == "t"


def test_v3_created_answer_with_201() -> None:
    body = {"code": 201, "message": "created", "data": {"id": "p", "status": "created"}}
    assert V3.error_of(201, body) is None


def test_rate_limit_wording_never_hides_a_server_error() -> None:
    report = DH3.error_of(500, {"code": 500, "message": "upstream rate limit", "task_id": "t"})
    assert report is not None and report.status == 500
    report = DH3.error_of(200, {"code": 1003, "message": "requests too frequent"})
    assert report is not None and report.status == 429


def test_informational_fields_never_fail_a_finished_get3w_task() -> None:
    body = {
        "id": "x",
        "status": "completed",
        "code": "0",
        "outputs": ["https://o/1.png"],
        "timings": {"total": "123", "odd": "n/a"},
        "created_at": 1711612242,
        "estimated_duration": "52",
        "error": "",
    }
    snapshot = V1.read_poll("x", "m/m/t", body)
    assert snapshot.result is not None and snapshot.result.ok
    assert snapshot.result.timings == {"total": 123.0, "odd": None}
    assert V1.error_of(200, body) is None


def test_nananobanana_async_acceptance_is_never_a_result() -> None:
    body = {"success": True, "async": True, "generationId": "g", "imageUrls": []}
    assert NANO.read_submit("nano-banana", body).result is None


def test_nananobanana_poll_without_data_wrapper() -> None:
    snapshot = NANO.read_poll(
        "g",
        "nano-banana",
        {"id": "g", "processingStatus": "completed", "outputImageUrls": ["https://x/1.png"]},
    )
    assert snapshot.result is not None and snapshot.result.urls == ("https://x/1.png",)


def test_unknown_status_word_is_taken_as_running() -> None:
    snapshot = V1.read_poll("x", "m/m/t", {"id": "x", "status": "uploading"})
    assert snapshot.status is TaskStatus.PROCESSING and snapshot.result is None
    assert snapshot.unknown_status == "uploading"  # the follower warns, once per job


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "created"}, "$.id"),
        ({"id": 3, "status": "created"}, "$.id"),
        ({"id": "x", "status": 5}, "$.status"),
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
