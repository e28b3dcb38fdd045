"""The emulator's account-limit knobs: their checks, and the runtime control route's changes.

Every check is a pure function answering what is wrong (a sentence) or None, shared by
`Emulator()` (ValueError), `POST /_emulator/control` (HTTP 400) and the CLI (exit 2).
A problem text never repeats a key or a value given: either may be an API key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ._state import ACCOUNT_NAMES, PROVIDERS, EmulatorConfig

if TYPE_CHECKING:
    from ._core import Core

Check = Callable[[object], str | None]


def is_count(value: object, least: int) -> bool:
    """Whether `value` is an int (not a bool) of at least `least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def account_problem(account: object) -> str | None:
    """What is wrong with an account name of `max_concurrent`, or None."""
    if account == "get3w_v3":
        return "get3w_v3 shares the get3w account: cap both Get3W APIs as 'get3w'"
    if account not in ACCOUNT_NAMES:
        return f"max_concurrent accounts are {', '.join(ACCOUNT_NAMES)}"
    return None


def caps_problem(caps: object, removable: bool = False) -> str | None:
    """What is wrong with a `max_concurrent` mapping (account -> cap >= 1), or None.

    `removable` (control route) also allows null, which removes that account's cap."""
    if not isinstance(caps, Mapping):
        return "max_concurrent must map an account to a positive integer"
    for account, cap in caps.items():
        problem = account_problem(account)
        if problem is not None:
            return problem
        if not (is_count(cap, 1) or (removable and cap is None)):
            return f"max_concurrent[{account!r}] must be a positive integer"
    return None


def balances_problem(balances: object, removable: bool = False) -> str | None:
    """What is wrong with a `get3w_balance` mapping (key -> creates left >= 0), or None."""
    if not isinstance(balances, Mapping):
        return "get3w_balance must map an API key to an integer >= 0"
    for key, units in balances.items():
        if not isinstance(key, str) or not key:
            return "get3w_balance keys must be non-empty strings"
        if not (is_count(units, 0) or (removable and units is None)):
            return "get3w_balance values must be integers >= 0"
    return None


def providers_problem(names: object, field: str = "down") -> str | None:
    """What is wrong with a collection of provider names, or None."""
    if isinstance(names, str | bytes) or not isinstance(names, list | set | frozenset | tuple):
        return f"{field} must be a list of provider names"
    if not all(name in PROVIDERS for name in names):
        return f"{field} names must be among {', '.join(PROVIDERS)}"
    return None


def keys_problem(keys: object) -> str | None:
    """What is wrong with a collection of revoked keys, or None."""
    if isinstance(keys, str | bytes) or not isinstance(keys, list | set | frozenset | tuple):
        return "revoked_keys must be a list of API keys"
    if not all(isinstance(key, str) and key for key in keys):
        return "revoked_keys must hold non-empty strings"
    return None


def credits_problem(credits: object) -> str | None:
    """What is wrong with a credit balance (an integer >= 0), or None."""
    return None if is_count(credits, 0) else "credits must be an integer >= 0"


def retry_after_problem(seconds: object) -> str | None:
    """What is wrong with `capacity_retry_after` (null or a number >= 0), or None."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds < math.inf:
        return "capacity_retry_after must be null or a finite number >= 0"
    return None


def api_keys_problem(keys: object) -> str | None:
    """What is wrong with `api_keys` (null, or provider -> its one key), or None."""
    if keys is None:
        return None
    if not isinstance(keys, Mapping):
        return "api_keys must be null or map a provider to its key"
    if not all(name in PROVIDERS or name == "get3w" for name in keys):
        return f"api_keys providers must be among {', '.join(PROVIDERS)}"
    if not all(isinstance(key, str) and key for key in keys.values()):
        return "api_keys values must be non-empty strings"
    return None


def config_problem(config: EmulatorConfig) -> str | None:
    """The first thing wrong with a config's account limits, or None."""
    checks = (
        caps_problem(config.max_concurrent),
        balances_problem(config.get3w_balance),
        providers_problem(config.down),
        keys_problem(config.revoked_keys),
        credits_problem(config.credits),
        retry_after_problem(config.capacity_retry_after),
    )
    return next((problem for problem in checks if problem is not None), None)


#: What `POST /_emulator/control` may change, each with its check.
CONTROL_CHECKS: dict[str, Check] = {
    "credits": credits_problem,
    "max_concurrent": lambda value: caps_problem(value, removable=True),
    "get3w_balance": lambda value: balances_problem(value, removable=True),
    "down": providers_problem,
    "revoked_keys": keys_problem,
    "api_keys": api_keys_problem,
    "capacity_retry_after": retry_after_problem,
}


def control_problem(body: object) -> str | None:
    """What is wrong with a control request body, or None (nothing is applied when not None)."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    unknown = sorted(set(body) - set(CONTROL_CHECKS))
    if unknown:
        return f"unknown fields {unknown}; expected some of {sorted(CONTROL_CHECKS)}"
    return next((p for name, value in body.items() if (p := CONTROL_CHECKS[name](value))), None)


def merged(current: Mapping[str, int], changes: Mapping[str, int | None]) -> dict[str, int]:
    """`current` with each named entry set, or removed where the change is null."""
    result = dict(current)
    for name, value in changes.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = value
    return result


def apply_control(core: Core, body: dict[str, Any]) -> None:
    """Apply a checked control body: mappings merge (null removes), lists and scalars replace."""
    config = core.config
    if "credits" in body:
        core.credits = body["credits"]
    if "max_concurrent" in body:
        config.max_concurrent = merged(config.max_concurrent, body["max_concurrent"])
    if "get3w_balance" in body:
        core.get3w_balance = merged(core.get3w_balance, body["get3w_balance"])
    if "down" in body:
        config.down = set(body["down"])
    if "revoked_keys" in body:
        config.revoked_keys = set(body["revoked_keys"])
    if "api_keys" in body:
        config.api_keys = None if body["api_keys"] is None else dict(body["api_keys"])
    if "capacity_retry_after" in body:
        config.capacity_retry_after = body["capacity_retry_after"]


def control_state(core: Core) -> dict[str, Any]:
    """The limits now in force and what each key is running (api_keys are not shown)."""
    config = core.config
    return {
        "credits": core.credits,
        "max_concurrent": dict(config.max_concurrent),
        "get3w_balance": dict(core.get3w_balance),
        "down": sorted(config.down),
        "revoked_keys": sorted(config.revoked_keys),
        "capacity_retry_after": config.capacity_retry_after,
        "running": core.running_now(),
    }
