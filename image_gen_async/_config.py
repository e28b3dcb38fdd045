"""Checks of configuration and call arguments, written once for the session and the CLI.

Each rule is a pure ``*_problem(value) -> reason | None`` (the CLI turns a reason into an
argparse error) and a raising wrapper that names the parameter: ``ConfigurationError`` for
a session's settings, ``InvalidRequestError`` for one call's arguments. Every check runs
before anything is sent, so a bad value never costs a paid create.

Decisions:
- Durations are finite numbers of seconds above 0. ``inf`` is refused too: the library
  promises that every handle ends, so there is no "no deadline" (pass a large number).
- ``bool`` is not a number and ``"10"`` is not one either: both are refused, not coerced.
- Messages never repeat an API key, a webhook secret or a URL's credentials or query:
  they say what is wrong and where, not what the value was.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import cast

from yarl import URL

from ._polling import PollSettings
from .errors import ConfigurationError, ImageGenError, InvalidRequestError

ErrorType = type[ImageGenError]

# Longest repr of a (non-secret) value repeated in a message.
SHOWN_CHARS = 40


def shown(value: object) -> str:
    """A short, typed description of a non-secret value, for a message."""
    if isinstance(value, bool | str | bytes):
        text = repr(value)
        if len(text) > SHOWN_CHARS:
            text = text[: SHOWN_CHARS - 3] + "..."
        return f"{type(value).__name__} {text}"
    if isinstance(value, numbers.Real):
        return repr(value)
    return f"a {type(value).__name__}"


def _range_text(low: float, low_inclusive: bool, high: float, high_inclusive: bool) -> str:
    if math.isinf(high):
        return f"a finite number {'of at least' if low_inclusive else 'above'} {low:g}"
    return f"a number in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"


def number_problem(
    value: object,
    *,
    low: float = 0.0,
    low_inclusive: bool = False,
    high: float = math.inf,
    high_inclusive: bool = False,
) -> str | None:
    """Why ``value`` is not a finite real number in the given range, or None when it is."""
    wanted = _range_text(low, low_inclusive, high, high_inclusive)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"must be {wanted}, got {shown(value)}"
    number = float(value)
    if not math.isfinite(number):
        return f"must be {wanted}, got {number!r}"
    above_low = number >= low if low_inclusive else number > low
    below_high = number <= high if high_inclusive else number < high
    if not (above_low and below_high):
        return f"must be {wanted}, got {value!r}"
    return None


def whole_problem(value: object, minimum: int) -> str | None:
    """Why ``value`` is not an ``int`` of at least ``minimum`` (a bool or 3.0 is not), or None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return f"must be a whole number of at least {minimum}, got {shown(value)}"
    if value < minimum:
        return f"must be at least {minimum}, got {value!r}"
    return None


def _raise_if(problem: str | None, name: str, error: ErrorType) -> None:
    if problem is not None:
        raise error(f"{name} {problem}")


def positive_number(name: str, value: object, *, error: ErrorType = ConfigurationError) -> float:
    """``value`` as a float when it is a finite number above 0; else ``error`` naming ``name``."""
    _raise_if(number_problem(value), name, error)
    return float(cast(float, value))  # a Real, checked above


def optional_positive_number(
    name: str, value: object, *, error: ErrorType = ConfigurationError
) -> float | None:
    """None (the default applies), or a finite number above 0."""
    return None if value is None else positive_number(name, value, error=error)


def number_in(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    high_inclusive: bool = False,
    error: ErrorType = ConfigurationError,
) -> float:
    """``value`` as a float when ``low <= value < high`` (or ``<= high``); else ``error``."""
    problem = number_problem(value, low=low, low_inclusive=True, high=high, high_inclusive=high_inclusive)
    _raise_if(problem, name, error)
    return float(cast(float, value))  # a Real, checked above


def whole_number(name: str, value: object, minimum: int, *, error: ErrorType = ConfigurationError) -> int:
    """``value`` when it is an int of at least ``minimum``; else ``error`` naming ``name``."""
    _raise_if(whole_problem(value, minimum), name, error)
    return int(cast(int, value))  # an Integral, checked above


def optional_whole_number(
    name: str, value: object, minimum: int, *, error: ErrorType = ConfigurationError
) -> int | None:
    """None (the default applies), or an int of at least ``minimum``."""
    return None if value is None else whole_number(name, value, minimum, error=error)


def retry_bounds(retry_base: object, retry_cap: object) -> tuple[float, float]:
    """``retry_base`` and ``retry_cap``: finite, above 0, the cap no lower than the base."""
    base = positive_number("retry_base", retry_base)
    cap = positive_number("retry_cap", retry_cap)
    if cap < base:
        raise ConfigurationError(f"retry_cap ({cap:g}) must be at least retry_base ({base:g})")
    return base, cap


def key_problem(key: str) -> str | None:
    """Why a (trimmed) key cannot go in an HTTP header, or None; never quotes the key."""
    if not key.isascii():
        return "contains a non-ASCII character"
    if not key.isprintable() or any(char.isspace() for char in key):
        return "contains spaces or control characters"
    return None


def _trimmed_key(label: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigurationError(f"{label} must be a str, got a {type(value).__name__}")
    key = value.strip()
    problem = key_problem(key)
    if problem is not None:
        raise ConfigurationError(f"the API key in {label} {problem}")
    return key


def api_key(label: str, value: object) -> str:
    """A given key ready for the header, trimmed of pasted whitespace; an empty one is refused.

    ``label`` says where it came from (``api_keys['dh3']``); the message never repeats the
    key, not even for a key of the wrong type.
    """
    key = _trimmed_key(label, value)
    if not key:
        raise ConfigurationError(f"{label} is empty: leave the client out to use its environment variable")
    return key


def api_keys(label: str, value: object) -> tuple[str, ...]:
    """One client's keys: a str, or a non-empty list/tuple of str, each cleaned like ``api_key``.

    A key given twice is refused: it would be one account counted as two (twice its cap).
    """
    if isinstance(value, str):
        return (api_key(label, value),)
    if not isinstance(value, list | tuple):
        raise ConfigurationError(
            f"{label} must be a str, got a {type(value).__name__} (or give a list of str: several keys)"
        )
    if not value:
        raise ConfigurationError(f"{label} is an empty list: give at least one key, or leave the client out")
    keys = tuple(api_key(f"{label}[{index}]", item) for index, item in enumerate(value))
    for index, key in enumerate(keys):
        if key in keys[:index]:
            raise ConfigurationError(f"{label}[{index}] repeats an earlier key: each key must be given once")
    return keys


def env_key(env_var: str, environ: Mapping[str, str]) -> str | None:
    """The key in ``environ[env_var]``, trimmed; None when unset or blank (a shell's ``X=``)."""
    return _trimmed_key(env_var, environ.get(env_var, "")) or None


def resolve_keys(
    name: str,
    fallback: str | None,
    keys: Mapping[str, tuple[str, ...]],
    env_var: str,
    environ: Mapping[str, str],
) -> tuple[str, ...]:
    """A client's keys, first one first: its own in ``keys`` (already checked), the ones it
    borrows, else the environment's one (empty: none)."""
    for owner in (name, fallback):
        if owner is not None and owner in keys:
            return keys[owner]
    key = env_key(env_var, environ)
    return () if key is None else (key,)


def call_timeout(timeout: object) -> float | None:
    """A call's ``timeout``: None (the session's ``task_timeout``) or finite seconds above 0."""
    return optional_positive_number("timeout", timeout, error=InvalidRequestError)


def callback_url(value: object) -> str | None:
    """A call's ``webhook_url``: None, or an absolute http(s) URL with a host (a query allowed:
    it may carry the token). The reason never repeats the URL."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequestError(f"webhook_url must be a str, got a {type(value).__name__}")
    try:
        url = URL(value)
        usable = url.scheme in ("http", "https") and bool(url.host)
    except (ValueError, TypeError):
        usable = False
    if not usable:
        raise InvalidRequestError("webhook_url must be an absolute http(s) URL with a host")
    return value


def origin_problem(value: object) -> str | None:
    """Why ``value`` is not an http(s) origin (a path prefix allowed), or None.

    The reason never repeats the URL: it may carry credentials or a token in its query.
    """
    if not isinstance(value, str):
        return f"must be a str, got a {type(value).__name__}"  # bytes could hold credentials
    if not value.strip():
        return "is empty (omit it for the provider's public host)"
    try:
        url = URL(value.strip())
        host = url.host
    except (ValueError, TypeError):
        return "is not a URL"
    if url.scheme not in ("http", "https"):
        got = f"scheme {url.scheme!r}" if url.scheme else "no scheme"
        return f"must be an http(s) URL like https://host, got {got}"
    if url.user is not None or url.password is not None:
        return "must not carry credentials (user:password@)"
    if not host:
        return "has no host"
    if url.query_string or url.fragment:
        return "must not carry a query or fragment"
    return None


def origin(label: str, value: object) -> URL:
    """``value`` as the URL every request of a client goes to; ``ConfigurationError`` if not one."""
    _raise_if(origin_problem(value), label, ConfigurationError)
    return URL(str(value).strip())


def secret_text(label: str, value: object) -> str:
    """A webhook signing secret: a non-empty str (never repeated in the message)."""
    if not isinstance(value, str):
        raise ConfigurationError(f"{label} must be a str, got a {type(value).__name__}")
    if not value.strip():
        raise ConfigurationError(f"{label} is empty")
    return value


def mapping(label: str, value: object) -> dict[str, object]:
    """A copy of an optional mapping argument (None is empty); ``ConfigurationError`` if not one."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        # Only the type: ``api_keys="sk-..."`` (a key where a mapping belongs) must not show the key.
        raise ConfigurationError(
            f"{label} must be a mapping of client name to value, got a {type(value).__name__}"
        )
    return dict(value)


def poll_settings(value: object) -> PollSettings:
    """``value`` when it is a ``PollSettings`` whose every field is in range (None: defaults)."""
    if value is None:
        return PollSettings()
    if not isinstance(value, PollSettings):
        raise ConfigurationError(f"polling must be a PollSettings, got {shown(value)}")
    for field in ("growth", "first_poll", "min_interval", "max_interval", "webhook_unknown_wait"):
        positive_number(f"polling.{field}", getattr(value, field))
    number_in("polling.webhook_grace", value.webhook_grace, 0.0, math.inf)
    whole_number("polling.history", value.history, 1)
    if value.max_interval < value.min_interval:
        raise ConfigurationError("polling.max_interval must be at least polling.min_interval")
    return value
