"""Server-sent events, read within bounds: a pure line decoder and the open stream around it.

nananobanana's ``mode: "stream"`` answers ``text/event-stream``: ``data: {...}`` events,
separated by blank lines, and ``: heartbeat`` comments while the job runs. A hostile server
can send a line that never ends, an event of many megabytes, or a byte at a time: the
decoder caps every line and event, and the stream bounds the wait for each one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import aiohttp

from .errors import TransportError

# One event's data, decoded: an event is a small JSON object (URLs and a message).
MAX_EVENT_BYTES = 256 * 1024
# A line longer than this is not an event stream's.
MAX_LINE_BYTES = MAX_EVENT_BYTES
# What ``next()`` returns for a comment (a heartbeat): the stream is alive, nothing to read.
HEARTBEAT = b""
# The format lets a stream begin with one byte order mark, which is not part of its first line.
BOM = b"\xef\xbb\xbf"


class EventTooLarge(TransportError):
    """A line or an event over its cap: nothing more of the stream is read."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


class SseDecoder:
    """Bytes in, events out (each event's ``data`` lines joined, or ``HEARTBEAT`` for a comment).

    Follows the event-stream format: one leading byte order mark is dropped; lines end
    with LF, CR LF or CR; ``data:`` lines accumulate until a blank line; ``event:``, ``id:``
    and ``retry:`` fields are ignored (the JSON carries the type). Heartbeats in a row are
    one: a flood of comments costs one turn of the reader per chunk, not one per comment.
    """

    __slots__ = ("_data", "_data_bytes", "_head", "_line", "_pending_cr")

    def __init__(self) -> None:
        self._line = bytearray()
        self._data: list[bytes] | None = None
        # The joined event's size so far (newlines included): empty ``data:`` lines add up too.
        self._data_bytes = 0
        self._pending_cr = False
        self._head: bytearray | None = bytearray()  # the stream's first bytes, until a BOM is ruled in or out

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events completed by ``chunk``; ``EventTooLarge`` once a line or event is over its cap."""
        if self._head is not None:
            chunk = self._strip_bom(chunk)
        events: list[bytes] = []
        start = 0
        if self._pending_cr and chunk[:1] == b"\n":
            start = 1  # the LF of a CR LF split across chunks
        self._pending_cr = False
        end = len(chunk)
        while start < end:
            cut = _line_end(chunk, start)
            if cut < 0:
                self._line += chunk[start:]
                self._check_line()
                break
            self._line += chunk[start:cut]
            self._check_line()
            if chunk[cut : cut + 1] == b"\r":
                if cut + 1 == end:
                    self._pending_cr = True
                elif chunk[cut + 1 : cut + 2] == b"\n":
                    cut += 1
            start = cut + 1
            event = self._take_line(bytes(self._line))
            self._line.clear()
            if event is not None and not (event == HEARTBEAT and events[-1:] == [HEARTBEAT]):
                events.append(event)
        return events

    def _strip_bom(self, chunk: bytes) -> bytes:
        """The chunk without the stream's leading BOM (which may itself arrive split)."""
        assert self._head is not None
        head = bytes(self._head) + chunk
        if len(head) < len(BOM) and BOM.startswith(head):
            self._head = bytearray(head)
            return b""
        self._head = None  # decided: from here on, bytes pass as they come
        return head[len(BOM) :] if head.startswith(BOM) else head

    def _check_line(self) -> None:
        if len(self._line) > MAX_LINE_BYTES:
            raise EventTooLarge(f"event stream: a line over {MAX_LINE_BYTES} bytes")

    def _take_line(self, line: bytes) -> bytes | None:
        if not line:
            data, self._data, self._data_bytes = self._data, None, 0
            return b"\n".join(data) if data is not None else None
        if line.startswith(b":"):
            return HEARTBEAT if self._data is None else None
        name, _, value = line.partition(b":")
        if name == b"data":
            if value.startswith(b" "):
                value = value[1:]
            if self._data is None:
                self._data = []
            else:
                self._data_bytes += 1  # the newline that joins it to the line before
            self._data.append(value)
            self._data_bytes += len(value)
            if self._data_bytes > MAX_EVENT_BYTES:
                raise EventTooLarge(f"event stream: an event over {MAX_EVENT_BYTES} bytes")
        return None


def _line_end(chunk: bytes, start: int) -> int:
    """The index of the first CR or LF at or after ``start``, or -1."""
    lf, cr = chunk.find(b"\n", start), chunk.find(b"\r", start)
    if lf < 0 or cr < 0:
        return max(lf, cr)
    return min(lf, cr)


class EventStream:
    """An open event-stream answer: ``await next()`` is the next event's data, None at its end.

    Each wait for an event (a heartbeat counts) is bounded by ``idle`` seconds: a stream
    that trickles bytes but completes nothing is as good as dropped. ``close()`` lets go
    of the connection (the task at the provider keeps running); ``forget(stream)`` is called
    then, so an owner that tracks its open streams lets go of it too.
    """

    __slots__ = ("_decoder", "_done", "_forget", "_ready", "_response", "idle", "where")

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        where: str,
        idle: float,
        forget: Callable[[EventStream], object] | None = None,
    ) -> None:
        self._response = response
        self.where = where
        self.idle = idle
        self._forget = forget
        self._decoder = SseDecoder()
        self._ready: deque[bytes] = deque()
        self._done = False

    async def next(self) -> bytes | None:
        """The next event's data (``HEARTBEAT`` for a comment), None once the stream ended cleanly.

        Raises ``TransportError`` when the stream breaks, goes quiet for ``idle`` seconds
        or sends a line or event over its cap.
        """
        try:
            async with asyncio.timeout(self.idle):
                while not self._ready:
                    if self._done:
                        return None
                    chunk = await self._response.content.readany()
                    if not chunk:
                        self._done = True
                        self.close()
                        return None
                    self._ready.extend(self._decoder.feed(chunk))
        except TimeoutError:
            self.close()
            raise TransportError(f"{self.where}: no event within {self.idle:.1f} s") from None
        except (aiohttp.ClientError, RuntimeError) as error:
            # aiohttp raises RuntimeError("Connection closed.") to a read after its connection went.
            self.close()
            raise TransportError(f"{self.where}: the event stream broke ({type(error).__name__})") from None
        except TransportError:
            self.close()
            raise
        return self._ready.popleft()

    def close(self) -> None:
        """Let go of the connection; idempotent."""
        self._done = True
        forget, self._forget = self._forget, None
        if forget is not None:
            forget(self)
        self._response.close()

    def abort(self, why: str) -> None:
        """Close, waking a reader that waits for the next bytes with a ``TransportError``.

        Closing the connection alone may not wake it: aiohttp can leave a pending read of a
        response whose connection its pool closed waiting for bytes that never come.
        """
        self._response.content.set_exception(aiohttp.ClientConnectionError(why))
        self.close()
