"""The HTTP side of delivery: one `POST /v1/batch` to Segment, whatever happens, as a result.

The write key goes in HTTP Basic auth (key as user name, empty password), never in a log line or
an error: httpx's exceptions carry the URL, not the headers. Connections are kept alive and
reused. The answer's body is kept short (it is only for the record: Segment's bodies are not a
contract, and nothing is decided on them).
"""

from __future__ import annotations

import base64
import importlib.util
import sys
import time
from dataclasses import dataclass, field

import httpx

from relay import __version__

if importlib.util.find_spec("sniffio") is None:
    # httpcore asks for sniffio (to tell asyncio from trio) several times per request and takes
    # asyncio when it is missing, but Python does not remember a failed import: each attempt
    # searched every directory of sys.path again (docs/performance.md has its cost). Recording
    # the failure gives the same answer (ImportError, so asyncio) at once, to every later import.
    sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]

ANSWER_EXCERPT_CHARS = 500


@dataclass(frozen=True, slots=True)
class SendResult:
    status: int | None  # None: no HTTP answer (timeout, refused, reset)
    headers: dict[str, str] = field(default_factory=dict)
    answer: str = ""  # the start of Segment's answer body
    error: str | None = None  # what went wrong without an answer
    seconds: float = 0.0


class SegmentSender:
    def __init__(
        self,
        base_url: str,
        write_key: str,
        timeout_seconds: float,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")  # logged (never with the key)
        self.url = self.base_url + "/v1/batch"
        credentials = base64.b64encode(f"{write_key}:".encode()).decode("ascii")
        self._headers = {
            "Authorization": f"Basic {credentials}",
            "Content-Type": "application/json",
            "User-Agent": f"aircall-segment-relay/{__version__}",
        }
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_seconds),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
        )

    async def post(self, body: bytes) -> SendResult:
        started = time.perf_counter()
        try:
            response = await self._client.post(self.url, content=body, headers=self._headers)
        except httpx.TimeoutException as error:
            return SendResult(
                status=None,
                error=f"timeout: {type(error).__name__}",
                seconds=time.perf_counter() - started,
            )
        except httpx.HTTPError as error:
            return SendResult(
                status=None,
                error=f"{type(error).__name__}: {error}"[:ANSWER_EXCERPT_CHARS],
                seconds=time.perf_counter() - started,
            )
        return SendResult(
            status=response.status_code,
            headers=dict(response.headers),
            answer=response.text[:ANSWER_EXCERPT_CHARS],
            seconds=time.perf_counter() - started,
        )

    async def close(self) -> None:
        await self._client.aclose()
