"""Per-tunnel settings each side announces in its HELLO: what it is willing to receive."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from backhaul.wire.errors import ErrorCode, RemoteProtocolError
from backhaul.wire.frames import HEADER_SIZE, MAX_CONTROL_PAYLOAD, MAX_WINDOW

#: frp raised yamux's 256 KiB stream window to 6 MiB for throughput over long paths. Here the
#: window is also the queue a small request waits behind when it shares a tunnel with a bulk
#: transfer: the bytes in flight sit in the socket buffers in front of the slower side, first
#: in, first out. On loopback 2 MiB keeps a 256 MiB transfer at the rate 4 MiB gave and halves
#: that wait (bench/PROFILE.md, "Fairness"); 1 MiB cost throughput alone. While newer streams
#: share the tunnel, a transfer holds only 128 KiB in flight toward a peer that takes prompt
#: credit, 512 KiB toward one that does not (backhaul.wire.flow).
DEFAULT_STREAM_WINDOW = 2 * 1024 * 1024
DEFAULT_TUNNEL_WINDOW = 32 * 1024 * 1024
DEFAULT_MAX_DATA = 256 * 1024
DEFAULT_MAX_STREAMS = 1024
#: Frames a BATCH message may carry. Batching turns the many small frames of concurrent
#: requests (OPEN, RESPONSE, a short DATA) into one WebSocket message, one TLS record and one
#: write: the per-message cost of WebSocket framing, TLS and the system call is paid once.
DEFAULT_BATCH_FRAMES = 256
#: Head slots an agent keeps: the part of an OPEN head that is the same on every request of a
#: connection (its id, base URL, auth spec and sealed credentials, about 1.8 KiB with a hybrid
#: ML-KEM blob) crosses the tunnel once per slot, not on every request (docs/protocol.md,
#: "Head slots"). 64 slots of at most HEAD_SLOT_MAX bytes each (backhaul.wire.connection)
#: bound what a peer can make the agent keep: 4 MiB.
DEFAULT_HEAD_SLOTS = 64
_MIN_MAX_DATA = 1024
_LIMIT_MAX_DATA = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Settings:
    stream_window: int = DEFAULT_STREAM_WINDOW
    tunnel_window: int = DEFAULT_TUNNEL_WINDOW
    max_data: int = DEFAULT_MAX_DATA
    max_streams: int = DEFAULT_MAX_STREAMS
    #: A stream's receiver returns credit once this many of its bytes are consumed; left out,
    #: an eighth of ``stream_window``, not h2's half: a sender that holds a bulk stream's bytes
    #: in flight below the window while newer streams share the tunnel
    #: (backhaul.wire.flow.YIELD_IN_FLIGHT) must still see credit come back before it runs
    #: out. 0, from a peer that predates the setting: half the window.
    window_update: int = -1

    #: 1: this side returns the credit of a DATA frame flagged PROMPT_CREDIT as soon as it is
    #: consumed. 0 (a peer that predates the flag): senders never count on it.
    prompt_credit: int = 1

    #: 0: this side does not take BATCH frames (a peer that predates them announces nothing,
    #: which :meth:`from_dict` reads as 0).
    batch_frames: int = DEFAULT_BATCH_FRAMES

    #: Head slots this side keeps for OPEN heads it receives; 0 (a peer that predates them):
    #: every OPEN head is sent whole.
    head_slots: int = DEFAULT_HEAD_SLOTS

    def __post_init__(self) -> None:
        if self.window_update < 0:
            object.__setattr__(self, "window_update", self.stream_window // 8)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> Settings:
        """Parse a peer's settings; missing keys take the defaults, bad ones end the tunnel."""
        if raw is None:
            return cls(batch_frames=0, window_update=0, prompt_credit=0, head_slots=0)
        if not isinstance(raw, dict):
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "settings must be an object")
        values: dict[str, int] = {
            "batch_frames": 0,
            "window_update": 0,
            "prompt_credit": 0,
            "head_slots": 0,
        }
        limits = {
            "stream_window": (1, MAX_WINDOW),
            "tunnel_window": (1, MAX_WINDOW),
            "max_data": (_MIN_MAX_DATA, _LIMIT_MAX_DATA),
            "max_streams": (1, 1_000_000),
            "batch_frames": (0, 65_536),
            "window_update": (0, MAX_WINDOW),
            "prompt_credit": (0, 1),
            "head_slots": (0, 4096),
        }
        for key, (low, high) in limits.items():
            if key not in raw:
                continue
            value = raw[key]
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"invalid setting {key}")
            values[key] = value
        return cls(**values)

    @property
    def stream_update(self) -> int:
        """Consumed bytes after which this side returns a stream's credit."""
        return self.window_update or self.stream_window // 2

    @property
    def max_message(self) -> int:
        """Largest WebSocket message we accept under these settings."""
        return HEADER_SIZE + max(self.max_data, MAX_CONTROL_PAYLOAD)
