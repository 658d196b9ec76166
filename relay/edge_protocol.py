"""uvicorn's HTTP protocol with :mod:`relay.edge`'s direct invoke path built in.

The subclass is made at startup, on the protocol class uvicorn picked, so it lives apart
from :mod:`relay.edge`: a class made inside a function does not compile with mypyc, and
the rest of the direct path does (setup.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from relay.edge import DirectBody, answer, eligible

if TYPE_CHECKING:
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    from relay.fastpath import RelayApp


def with_direct_invoke(base: type, app: RelayApp, max_url: int, max_body: int) -> type:
    """``base`` (uvicorn's httptools protocol with the relay's head limits) answering
    :func:`eligible` invoke requests through :func:`answer` instead of the ASGI app."""

    class DirectInvokeProtocol(base):  # type: ignore[misc]
        #: The body of the direct request being answered, if any.
        direct_body: DirectBody | None = None

        def _start_asgi_task(self, cycle: RequestResponseCycle, asgi: object) -> None:
            # ``asgi`` is uvicorn's 503 answer past limit_concurrency: that one stands.
            if asgi is self.app and eligible(cycle.scope, max_url, max_body):  # type: ignore[arg-type]
                body = self.direct_body = DirectBody(cycle)
                task = self.loop.create_task(answer(cycle, app, body))
                task.add_done_callback(self.tasks.discard)
                self.tasks.add(task)
                return
            super()._start_asgi_task(cycle, asgi)

        def on_body(self, body: bytes) -> None:
            direct = self.direct_body
            if direct is None or direct.cycle is not self.cycle:
                super().on_body(body)  # an ASGI request, or a pipelined one not started yet
            elif not self.cycle.response_complete and not (
                self.parser.should_upgrade() and self._should_upgrade()
            ):  # the checks of uvicorn's on_body: a body after the answer, an upgrade's
                direct.feed(body)

    return DirectInvokeProtocol
