"""Saving a result's output files: streamed to disk, atomic, capped, named by us.

Output URLs live on storage hosts, not on the provider's API origin, so a download
never carries the Authorization header or any key. A file is written as a ``*.part``
in the target directory, fsynced and renamed into place, so a crash leaves either the
whole file or no file under the final name. The name is ``{safe task id}_{index}{ext}``
with the extension from the Content-Type: a server's ``file_name`` or URL path never
becomes a path.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
from pathlib import Path
from typing import IO

import aiohttp
import attrs
from yarl import URL

from ._classify import Failure, Verdict, classify_download
from ._engine import Engine, EngineSettings
from ._retry import Retry, RetryBudget, retrying
from ._transport import AnswerTooLarge as TooLarge
from ._transport import describe, read_capped, retry_after_seconds
from .errors import DownloadError, ImageGenError, InvalidRequestError, TransportError
from .models import TaskResult

log = logging.getLogger("image_gen_async")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# Retries of a transient download failure when the session bounds no poll retries.
DOWNLOAD_RETRIES = 4
EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}
OTHER_EXTENSION = ".bin"
# Long ids are cut so that a file name stays well under the usual 255-byte limit.
MAX_STEM = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def safe_task_id(task_id: str) -> str:
    """``task_id`` reduced to ``[A-Za-z0-9_.-]``, never starting with ``.``.

    When anything had to change, a short hash of the original is appended, so two
    different ids (``a/b`` and ``a_b``) never share a file name.
    """
    safe = _UNSAFE.sub("_", task_id)[:MAX_STEM] or "task"
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe != task_id:
        safe += "-" + hashlib.sha256(task_id.encode()).hexdigest()[:8]
    return safe


def extension_for(content_type: str | None) -> str:
    """``.png``, ``.jpg``, ``.webp`` from the Content-Type, else ``.bin``."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    return EXTENSIONS.get(kind, OTHER_EXTENSION)


def existing_file(directory: Path, stem: str) -> Path | None:
    """A file saved earlier under one of the names this output can have, if any."""
    for ext in (*EXTENSIONS.values(), OTHER_EXTENSION):
        path = directory / f"{stem}{ext}"
        if path.is_file():
            return path
    return None


def check_url(url: str, where: str) -> None:
    """Refuse anything but an absolute http(s) URL (``file://``, ``ftp://``, relative paths)."""
    try:
        parsed = URL(url)
        host = parsed.host  # decoding an IDNA host can fail (UnicodeError is a ValueError)
        if host:
            host.encode("idna")  # ... and so can encoding it for the connection (a 70-char label)
    except (TypeError, ValueError):
        raise DownloadError(f"{where}: not a URL") from None
    if parsed.scheme.lower() not in ("http", "https") or not host:
        scheme = parsed.scheme or "relative"
        raise DownloadError(f"{where}: refusing a {scheme!r} URL; only http(s) is downloaded")


@attrs.frozen
class _Planned:
    url: str
    stem: str
    where: str
    saved: Path | None


def _plan(result: TaskResult, directory: Path) -> list[_Planned]:
    """Check every URL before fetching any, and find the outputs saved earlier."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DownloadError(f"cannot save to {directory}: {error.strerror or error}") from None
    stem_base = safe_task_id(result.task_id)
    planned = []
    for index, output in enumerate(result.outputs):
        where = f"{result.provider} task {result.task_id} output {index}"
        check_url(output.url, where)
        stem = f"{stem_base}_{index}"
        planned.append(_Planned(output.url, stem, where, existing_file(directory, stem)))
    return planned


async def download_result(
    engine: Engine, result: TaskResult, directory: Path, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> list[Path]:
    """Save every output of ``result`` in ``directory``; the paths, in output order.

    An output already saved under its final name is not fetched again, so a resumed
    batch never duplicates a file. Transient failures are retried within the session's
    poll budget (``poll_retries``, or ``DOWNLOAD_RETRIES`` when that is unbounded).
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise InvalidRequestError(f"max_bytes must be a positive whole number of bytes, got {max_bytes!r}")
    paths: list[Path] = []
    for item in _plan(result, directory):
        path = item.saved
        if path is None:
            path = await _fetch_with_retries(engine, item.url, directory, item.stem, max_bytes, item.where)
        paths.append(path)
    return paths


def download_budget(settings: EngineSettings) -> RetryBudget:
    """The poll budget's count (``poll_retries=0`` means no retries here either), else DOWNLOAD_RETRIES."""
    retries = DOWNLOAD_RETRIES if settings.poll_retries is None else settings.poll_retries
    return RetryBudget(retries + 1, settings.retry_base, settings.retry_cap)


async def _fetch_with_retries(
    engine: Engine, url: str, directory: Path, stem: str, max_bytes: int, where: str
) -> Path:
    def on_retry(tries: int, wait: float, error: ImageGenError) -> None:
        log.warning("download of %s retry %d in %.2f s: %s", where, tries, wait, describe(error))

    async def attempt() -> Path:
        try:
            return await _fetch(engine, url, directory, stem, max_bytes, where)
        except _Refused as refused:
            if classify_download(http_status=refused.status) is Verdict.RETRY:
                raise Retry(refused) from None
            raise DownloadError(str(refused)) from None
        except TooLarge as error:
            raise DownloadError(str(error)) from None
        except (aiohttp.ClientError, TimeoutError) as error:
            failure = _failure_of(error)
            text = f"download of {where} failed: {describe(error)}"
            if classify_download(http_status=None, failure=failure) is Verdict.RETRY:
                raise Retry(TransportError(text)) from None
            if failure is Failure.BAD_URL:
                raise DownloadError(text) from None
            raise TransportError(text, transient=False) from None
        except OSError as error:
            # The disk, not the network: full, read-only, no permission. This job fails; others go on.
            raise DownloadError(f"{where}: cannot save to {directory}: {error.strerror or error}") from None

    return await retrying(attempt, download_budget(engine.settings), on_retry=on_retry)


def _failure_of(error: BaseException) -> Failure | None:
    if isinstance(error, aiohttp.ClientSSLError):
        return Failure.TLS
    if isinstance(error, aiohttp.InvalidURL | aiohttp.TooManyRedirects):
        return Failure.BAD_URL
    return None


class _Refused(DownloadError):
    """A status other than 200, and the server's ``Retry-After`` with it."""

    def __init__(self, message: str, status: int, retry_after: float | None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


async def _fetch(engine: Engine, url: str, directory: Path, stem: str, max_bytes: int, where: str) -> Path:
    """One GET streamed into a ``*.part`` file, then renamed into place; bounded in bytes and time."""
    transport = engine.transport
    # No Authorization header: the session adds none of its own, and none is passed here.
    async with transport.get(
        url, limit=engine.settings.download_timeout, accept="image/*, */*;q=0.5"
    ) as response:
        status = response.status
        if status != 200:
            raise _Refused(f"{where}: HTTP {status}", status, retry_after_seconds(response.headers))
        final = directory / f"{stem}{extension_for(response.content_type)}"
        part = directory / f"{final.name}.{secrets.token_hex(4)}.part"
        file = _open_part(part)
        size = 0
        try:
            async for chunk in read_capped(response, max_bytes, where):
                size += len(chunk)
                file.write(chunk)
        except BaseException:
            _discard(file, part)
            raise
        # fsync takes a millisecond or so: off the event loop. From here the thread owns the
        # file; shielded, so a cancelled download still ends with the whole file or none.
        await asyncio.shield(asyncio.to_thread(_commit, file, part, final))
    log.debug("saved %s (%d bytes)", final.name, size)
    return final


def _open_part(part: Path) -> IO[bytes]:
    # "x": a part name is random, so an existing file means something else owns it.
    return open(part, "xb")


def _discard(file: IO[bytes], part: Path) -> None:
    file.close()
    part.unlink(missing_ok=True)


def _commit(file: IO[bytes], part: Path, final: Path) -> None:
    """fsync the data, then rename into place: the final name never holds a torn file.

    The directory is fsynced after the rename, so the new name survives a power loss too
    (best effort: some filesystems cannot fsync a directory).
    """
    try:
        file.flush()
        os.fsync(file.fileno())
        file.close()
        os.replace(part, final)
    except BaseException:
        _discard(file, part)
        raise
    _fsync_directory(final.parent)


def _fsync_directory(directory: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows: no directory descriptors
        return
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # the file is in place; only its durability across a power loss is unsure
    finally:
        os.close(descriptor)
