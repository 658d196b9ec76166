"""Body pieces waiting to go on (backhaul.chunks)."""

from __future__ import annotations

from backhaul.chunks import BULK, join_small


def test_bulk_pieces_go_as_they_came_and_small_runs_are_joined() -> None:
    big, other = b"B" * BULK, b"C" * (BULK + 1)
    pieces = join_small([b"a", b"b", big, b"c", other, b"d", b"e"])
    assert pieces == [b"ab", big, b"c", other, b"de"]
    assert pieces[1] is big and pieces[3] is other  # handed on, not copied


def test_nothing_waiting_is_nothing_to_send() -> None:
    assert join_small([]) == []
