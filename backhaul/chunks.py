"""Body pieces waiting to go on: bulk ones as they came, small ones joined.

Both ends buffer a body's pieces while the next hop is busy: the agent the API's response
(:mod:`agent.upstream`), the relay a caller's upload (:mod:`relay.edge`). When the pieces go
on, a bulk one is handed on as it is (copying it would cost more than the message it saves)
and each run of small ones is joined into one, so a trickle does not become a message per
piece.
"""

from __future__ import annotations

__all__ = ["BULK", "join_small"]

#: Pieces this large are handed on as they came.
BULK = 64 * 1024


def join_small(chunks: list[bytes]) -> list[bytes]:
    """``chunks`` in order, bulk pieces as they are and each run of smaller ones joined."""
    pieces: list[bytes] = []
    run: list[bytes] = []
    for chunk in chunks:
        if len(chunk) >= BULK:
            if run:
                pieces.append(b"".join(run))
                run = []
            pieces.append(chunk)
        else:
            run.append(chunk)
    if run:
        pieces.append(b"".join(run))
    return pieces
