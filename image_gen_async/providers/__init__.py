"""Provider codecs: one pure translation table per API, keyed by client name."""

from __future__ import annotations

from collections.abc import Mapping

from ._base import Codec, ErrorReport, HttpRequest, Refusal, Snapshot
from .dh3 import Dh3Codec
from .get3w import Get3WV1Codec, Get3WV3Codec
from .nananobanana import NananobananaCodec

CODECS: Mapping[str, Codec] = {
    codec.name: codec for codec in (Get3WV1Codec(), Get3WV3Codec(), Dh3Codec(), NananobananaCodec())
}

# A model id per client that its API documents: for examples, the demo and tests.
EXAMPLE_MODELS: Mapping[str, str] = {name: codec.example_model for name, codec in CODECS.items()}

# A client without a key or origin of its own borrows these (the two Get3W APIs share an account).
FALLBACK_CLIENT: Mapping[str, str] = {"get3w_v3": "get3w"}

__all__ = [
    "CODECS",
    "EXAMPLE_MODELS",
    "FALLBACK_CLIENT",
    "Codec",
    "ErrorReport",
    "HttpRequest",
    "Refusal",
    "Snapshot",
]
