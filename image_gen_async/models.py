"""Result models and the one strict cattrs converter that reads provider JSON.

cattrs coerces quietly by default (``"false"`` becomes ``True``, ``3`` becomes
``"3"``); the hooks here refuse that, and any misfit becomes a ``ProtocolError``
naming the field path (``required field missing @ $.data.status``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.cols import is_mapping, is_sequence, list_structure_factory, mapping_structure_factory
from cattrs.errors import BaseValidationError

from .errors import ProtocolError

T = TypeVar("T")


class TaskStatus(enum.Enum):
    """One status vocabulary for every provider; each codec maps its own words onto it."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        """True once the task can no longer change."""
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED)


@attrs.frozen
class Output:
    """One generated file; what the provider did not say is ``None``."""

    url: str
    content_type: str | None = None
    width: int | None = None
    height: int | None = None
    file_name: str | None = None
    file_size: int | None = None


@attrs.frozen
class TaskResult:
    """A finished task as the provider reported it; ``raw`` is the provider's own JSON."""

    task_id: str
    provider: str
    model: str
    status: TaskStatus
    outputs: tuple[Output, ...] = ()
    error: str | None = None
    timings: Mapping[str, float | None] | None = None
    raw: Any = attrs.field(default=None, repr=False, eq=False)
    # What the task cost, where the provider says (nananobanana ``creditsUsed``).
    credits_used: float | None = None

    @property
    def urls(self) -> tuple[str, ...]:
        """The output URLs, in the provider's order."""
        return tuple(output.url for output in self.outputs)

    @property
    def ok(self) -> bool:
        """True when the task completed."""
        return self.status is TaskStatus.COMPLETED


@attrs.frozen
class ModelInfo:
    """A model a provider lists (nananobanana ``GET /api/v1/models``); unknowns as None."""

    name: str
    display_name: str | None = None
    credits_cost: float | None = None
    supports_image_input: bool | None = None
    supports_aspect_ratio: bool | None = None
    requires_pro: bool | None = None
    raw: Any = attrs.field(default=None, repr=False, eq=False)


def _strict(expected: type[Any]) -> Any:
    def hook(value: Any, _: Any) -> Any:
        # bool is an int subclass: never let True pass as 1.
        if isinstance(value, bool) and expected is not bool:
            raise TypeError(f"expected {expected.__name__}, got bool")
        if not isinstance(value, expected):
            raise TypeError(f"expected {expected.__name__}, got {type(value).__name__}")
        return value

    return hook


def _float(value: Any, _: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _only(container: type[Any], factory: Any) -> Any:
    """Wrap a cattrs collection hook factory so a string is never read as a list of letters."""

    def make(kind: Any, conv: cattrs.Converter) -> Any:
        inner = factory(kind, conv)

        def hook(value: Any, target: Any) -> Any:
            if not isinstance(value, container):
                raise TypeError(f"expected {container.__name__}, got {type(value).__name__}")
            return inner(value, target)

        return hook

    return make


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=False, detailed_validation=True)
    for kind in (str, int, bool):
        conv.register_structure_hook(kind, _strict(kind))
    conv.register_structure_hook(float, _float)
    conv.register_structure_hook_factory(is_sequence, _only(list, list_structure_factory))
    conv.register_structure_hook_factory(is_mapping, _only(dict, mapping_structure_factory))
    return conv


converter = _make_converter()


def structure(data: Any, cls: type[T], *, provider: str, path: str = "$") -> T:
    """Read JSON into an attrs class, or raise ``ProtocolError`` naming the bad field.

    ``path`` is where ``data`` sits in the whole answer, so the field is named from its root.
    """
    try:
        return converter.structure(data, cls)
    except BaseValidationError as exc:
        problems = cattrs.transform_error(exc, path=path)
        raise ProtocolError(
            f"{provider}: response does not fit: {'; '.join(problems)}",
            field=problems[0].rpartition(" @ ")[2] if problems else None,
        ) from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ProtocolError(f"{provider}: response does not fit: {exc} @ {path}", field=path) from None
