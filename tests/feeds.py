"""A tunnel's ``feed`` for transport push tests: keeps what it takes, refuses once told to."""

from __future__ import annotations


class Feed:
    def __init__(self) -> None:
        self.fed: list[bytes] = []
        self.refusing = False

    def __call__(self, message: bytes) -> bool:
        if self.refusing:
            return False
        self.fed.append(message)
        return True
