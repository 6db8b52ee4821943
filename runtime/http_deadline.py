"""uvicorn's h11 protocol with a deadline on reading a request's headers (uvicorn has none).

Without it a client sending one byte a second holds a connection, and a slot of the connection limit, for as
long as it likes. The timer starts when the connection opens and again after each response; if no new request
(a new cycle) has begun when it fires, the connection is closed. The body's deadline is the handler's
(server._read_body): by then the app is running.
"""

from __future__ import annotations


def protocol_class(header_timeout_s: float):
    """An H11Protocol subclass closing connections whose request headers take longer than `header_timeout_s`."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def connection_lost(self, exc) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            waiting_after = self.cycle  # the cycle of the request before; a new request replaces it
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()

            def expire() -> None:
                if self.cycle is waiting_after and not self.transport.is_closing():
                    self.transport.close()

            self._header_timer = self.loop.call_later(header_timeout_s, expire)

    return DeadlineH11Protocol
