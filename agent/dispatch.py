"""Serve one stream: check the request head, open its credentials, call the internal API
and stream the response back. Every failure becomes a RESET with a code and a reason the
relay turns into a problem for the caller; nothing here can take the tunnel down.
"""

from __future__ import annotations

import time

import structlog

from agent import metrics
from agent.errors import AgentError, CredentialsInvalid
from agent.executor import Executor, UpstreamResponse
from agent.head import RequestHead
from agent.keyring import Keyring
from agent.reseal import serve_op
from agent.state import AgentState
from backhaul.aio.tunnel import StreamError, TransportClosed, TunnelStream
from backhaul.errors import SealError
from backhaul.keys import b64d
from backhaul.seal import GatewayKeyPair, open_sealed
from backhaul.tallies import Tallies, Tally, Timing
from backhaul.wire import ErrorCode

log = structlog.get_logger("backhaul.agent.dispatch")
_BYTES_DOWN = Tally(metrics.BYTES.labels("down"))
_REQUESTS = Tallies(metrics.REQUESTS)
_SECONDS = Timing(metrics.REQUEST_SECONDS)


#: AgentError.code → the RESET code the relay maps to an HTTP status.
#: Opened credentials are kept this long (and at most this many), in this process's memory
#: only; a re-sealed or rotated blob is a different key and opens afresh.
OPENED_CACHE_SECONDS = 60.0
OPENED_CACHE_SIZE = 1024

RESET_CODES = {
    "target_denied": ErrorCode.TARGET_DENIED,
    "bad_request_head": ErrorCode.BAD_REQUEST,
    "credentials_invalid": ErrorCode.CREDENTIALS_INVALID,
    "upstream_unreachable": ErrorCode.UPSTREAM_UNREACHABLE,
    "upstream_timeout": ErrorCode.DEADLINE_EXCEEDED,
    "upstream_error": ErrorCode.UPSTREAM_ERROR,
    "windows_auth_failed": ErrorCode.UPSTREAM_AUTH_FAILED,
    # Not processed: the relay may try a member that already holds the key version.
    "key_version_unavailable": ErrorCode.REFUSED_STREAM,
}


class Dispatcher:
    def __init__(
        self, executor: Executor, gateway_key: Keyring | GatewayKeyPair, state: AgentState
    ) -> None:
        self.executor = executor
        self.keyring = (
            gateway_key if isinstance(gateway_key, Keyring) else Keyring.in_memory(gateway_key)
        )
        self.state = state
        self._opened: dict[tuple[str, str, str, str, int], tuple[float, dict[str, object]]] = {}

    async def handle(self, stream: TunnelStream) -> None:
        if stream.head is not None and "op" in stream.head:  # a key rotation step
            await serve_op(stream, self.keyring, self.state.gateway_id)
            return
        started = time.monotonic()
        self.state.total += 1
        upstream: UpstreamResponse | None = None
        outcome: BaseException | None = None
        try:
            head = RequestHead.parse(stream.head or {})
            credentials = self._open(head)
            lean = self.executor.lean_path
            if lean is not None and not stream.has_body:  # the common case, compiled
                upstream = await lean.start(head, credentials)
            if upstream is None:
                upstream = await self.executor.start_general(
                    head, credentials, stream.iter_body(), has_body=stream.has_body
                )
            # When the body (or its first part) is already here, the RESPONSE waits for it
            # and both leave in one flush; otherwise the caller gets the head at once.
            await stream.send_response(
                {"status": upstream.status, "headers": upstream.headers},
                flush=not upstream.body_ready,
            )
            # One chunk of look-ahead: the last one goes out with END_STREAM, so a small
            # response is two frames (RESPONSE, DATA) instead of three.
            pending: bytes | None = None
            while (chunk := await upstream.next_chunk()) is not None:
                _BYTES_DOWN.inc(len(chunk))
                if pending is not None:
                    await stream.write(pending)
                pending = chunk
            await stream.write(pending or b"", end=True)
        except AgentError as failed:
            outcome = failed
            self.state.failed += 1
            code, reason = failed.code, failed.message
            log.warning("stream.failed", stream_id=stream.id, code=code, reason=reason)
            await stream.reset(RESET_CODES.get(code, ErrorCode.INTERNAL_ERROR), reason)
        except (StreamError, TransportClosed) as cancelled:
            outcome = cancelled
            log.info("stream.cancelled", stream_id=stream.id, reason=str(cancelled))
            await stream.reset(ErrorCode.CANCEL, "cancelled")
        except Exception as crashed:
            outcome = crashed
            self.state.failed += 1
            log.exception("stream.crashed", stream_id=stream.id)
            await stream.reset(ErrorCode.INTERNAL_ERROR, "agent error; see the agent's log")
        finally:
            if upstream is not None:
                await upstream.aclose()
            _REQUESTS("ok" if outcome is None else metrics.outcome_of(outcome)).inc()
            _SECONDS.observe(time.monotonic() - started)

    def _open(self, head: RequestHead) -> dict[str, object]:
        # The same blob, for the same connection and base URL, opens to the same credentials:
        # keep them briefly instead of running ML-KEM decapsulation on every request.
        cache_key = (head.sealed, head.suite, head.connection_id, head.base_url, head.key_version)
        cached = self._opened.get(cache_key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        key = self.keyring.get(head.key_version)
        try:
            blob = b64d(head.sealed)
            credentials = open_sealed(key, head.suite, blob, head.connection_id, head.base_url)
        except (SealError, ValueError) as exc:
            raise CredentialsInvalid(
                f"sealed credentials of connection {head.connection_id} do not open here: {exc}"
            ) from None
        if len(self._opened) >= OPENED_CACHE_SIZE:
            self._opened.pop(next(iter(self._opened)))
        self._opened[cache_key] = (time.monotonic() + OPENED_CACHE_SECONDS, credentials)
        return credentials
