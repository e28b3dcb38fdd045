"""JSON in and out, safe against hostile input: every failure is a ``ValueError``.

``json.loads`` of deeply nested brackets raises ``RecursionError`` and a lone surrogate
cannot be encoded as UTF-8; both would otherwise escape as errors nobody catches.
"""

from __future__ import annotations

import json
from typing import Any

# Separators and NaN handling fixed once: json.dumps with options builds an encoder per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def loads(raw: bytes | str) -> Any:
    """Parse JSON; ``ValueError`` for anything that is not JSON, nested too deep included."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON; ``ValueError`` for NaN, a lone surrogate, a non-JSON type or deep nesting."""
    try:
        return _ENCODER.encode(value).encode("utf-8")
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (a lone surrogate)") from None
    except TypeError as error:
        raise ValueError(str(error)) from None
