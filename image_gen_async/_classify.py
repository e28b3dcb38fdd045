"""What an exchange's outcome means: accepted, worth another try, uncertain, or final.

Pure functions, no I/O: the engine describes what happened (was the request sent? what
HTTP status? what does the codec say the body's error is? does it name a task?) and these
decide. Every rule of "never pay twice" is here, tested as a table.

Creates: a create is tried again only when the provider cannot have made the task —
nothing was sent (a retry, counted), or a 429 or 503 naming no task (a refusal: the job
waits for capacity or for the rate to allow it, and no retry is counted). An HTTP 5xx
other than 503 may have made the task whatever its body says, and so may any answer
naming a task id alongside an error, or a success answer we cannot read: those are
uncertain, never retried.

Polls and downloads are reads: any transient failure is tried again, until the budget ends.
"""

from __future__ import annotations

import enum


class Verdict(enum.Enum):
    """What to do with one exchange's outcome."""

    ACCEPTED = "accepted"  # use the answer
    RETRY = "retry"  # nothing was made (or it is a read): ask again after a wait
    REFUSED = "refused"  # a create refused for capacity or rate (429, 503): nothing made; wait, uncounted
    UNCERTAIN = "uncertain"  # a create that may have made a task: never sent again
    FAILED = "failed"  # final: asking again will not mend it


class Failure(enum.Enum):
    """How an exchange went wrong before its answer could be used."""

    NO_ANSWER = "no answer"  # refused, dropped or timed out: no (complete) answer came back
    TLS = "tls"  # a certificate problem: it will not mend by asking again
    TOO_LARGE = "too large"  # an answer over its size cap
    NOT_JSON = "not json"  # an answer that is not JSON (a proxy's error page, a truncated body)
    BAD_SHAPE = "bad shape"  # JSON that does not have the documented shape
    OTHER_TASK = "other task"  # a poll answered about another task id
    BAD_URL = "bad url"  # a download URL that is not http(s), or a redirect loop


def classify_create(
    *,
    sent: bool,
    http_status: int | None,
    error_status: int | None = None,
    names_task: bool = False,
    failure: Failure | None = None,
) -> Verdict:
    """A create's outcome.

    ``sent``: the request had a connection (it may have reached the provider).
    ``http_status``: None when no answer came back. ``error_status``: the HTTP-like status
    the codec reads the body's error as (its own ``code`` may say 503 under HTTP 200), None
    when the body reports no error. ``names_task``: the body carries a task id.
    """
    if http_status is None:
        if failure is Failure.TLS:
            return Verdict.FAILED
        return Verdict.UNCERTAIN if sent else Verdict.RETRY
    if 300 <= http_status < 400:
        return Verdict.FAILED  # a redirect is not followed (it could carry the key away)
    if names_task and (error_status is not None or failure is not None or http_status >= 400):
        return Verdict.UNCERTAIN  # an error that names a task may still have made it
    if http_status >= 500:
        # Whatever the body says: a 500 may have made the task. A 503 is the documented
        # "busy, nothing made" (nananobanana refunds it) — unless its body says a server
        # error of another kind, which may have made the task too.
        busy = http_status == 503 and error_status in (None, 429, 503)
        return Verdict.REFUSED if busy else Verdict.UNCERTAIN
    if error_status is not None:
        if error_status in (429, 503):
            return Verdict.REFUSED
        if error_status >= 500:
            return Verdict.UNCERTAIN
        return Verdict.FAILED
    if failure is not None:
        return Verdict.UNCERTAIN  # a success we cannot read: a task may exist
    return Verdict.ACCEPTED


def classify_poll(
    *,
    http_status: int | None,
    error_status: int | None = None,
    failure: Failure | None = None,
) -> Verdict:
    """A status read's outcome: a read is safe to repeat, so only a lasting answer is final."""
    if failure is Failure.TOO_LARGE:
        return Verdict.FAILED  # megabytes are not a status answer, and will not shrink
    if http_status is None:
        return Verdict.FAILED if failure is Failure.TLS else Verdict.RETRY
    if 300 <= http_status < 400:
        return Verdict.FAILED
    status = error_status if error_status is not None else (http_status if http_status >= 400 else None)
    if status is not None:
        return Verdict.RETRY if status in (408, 425, 429) or status >= 500 else Verdict.FAILED
    if failure in (Failure.NOT_JSON, Failure.OTHER_TASK):
        return Verdict.RETRY  # a proxy's page, a truncated body, a server mixing up tasks
    if failure is not None:
        return Verdict.FAILED  # JSON of the wrong shape: the same answer will come again
    return Verdict.ACCEPTED


def classify_download(*, http_status: int | None, failure: Failure | None = None) -> Verdict:
    """An output file's fetch."""
    if failure in (Failure.TLS, Failure.BAD_URL, Failure.TOO_LARGE):
        return Verdict.FAILED
    if http_status is None:
        return Verdict.RETRY
    if http_status == 200:
        return Verdict.ACCEPTED
    if http_status in (408, 425, 429) or http_status >= 500:
        return Verdict.RETRY
    return Verdict.FAILED
