"""Helpers for the wire tests: a relay and an agent Connection joined by hand."""

from __future__ import annotations

from dataclasses import dataclass, field

from backhaul.wire import Connection, Event, Role, Settings
from backhaul.wire import frames as f


@dataclass
class Pair:
    """A relay-role and an agent-role connection after a completed handshake."""

    relay: Connection
    agent: Connection
    #: Every frame delivered so far, per receiving side.
    to_agent: list[f.Frame] = field(default_factory=list)
    to_relay: list[f.Frame] = field(default_factory=list)

    def relay_to_agent(self) -> list[Event]:
        """Deliver everything the relay has queued to the agent."""
        return self._deliver(self.relay, self.agent, self.to_agent)

    def agent_to_relay(self) -> list[Event]:
        """Deliver everything the agent has queued to the relay."""
        return self._deliver(self.agent, self.relay, self.to_relay)

    @staticmethod
    def _deliver(src: Connection, dst: Connection, log: list[f.Frame]) -> list[Event]:
        events: list[Event] = []
        for message in src.data_to_send():
            log.append(f.decode(message, 2**32))
            events.extend(dst.receive_message(message))
        return events


def deliver(src: Connection, dst: Connection) -> list[Event]:
    events: list[Event] = []
    for message in src.data_to_send():
        events.extend(dst.receive_message(message))
    return events


def connect(relay_settings: Settings | None = None, agent_settings: Settings | None = None) -> Pair:
    """Run the three-message handshake and return both open connections."""
    relay = Connection(Role.RELAY, relay_settings)
    agent = Connection(Role.AGENT, agent_settings)
    relay.send_hello({"challenge": "c"})
    deliver(relay, agent)
    agent.send_hello({"signature": "s"})
    deliver(agent, relay)
    relay.send_welcome({"session_id": "ses_test"})
    deliver(relay, agent)
    return Pair(relay, agent)


def frames_of(messages: list[bytes]) -> list[f.Frame]:
    return [f.decode(m, 2**32) for m in messages]


def windows(messages: list[bytes]) -> list[tuple[int, int]]:
    """(stream id, increment) of every WINDOW frame in ``messages``."""
    return [
        (frame.stream_id, f.decode_window(frame))
        for frame in frames_of(messages)
        if frame.type == f.FrameType.WINDOW
    ]
