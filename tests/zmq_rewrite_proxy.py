"""A ZeroMQ proxy between one coordinator and one agent that rewrites replies.

The coordinator connects its DEALER to the proxy's ROUTER (`endpoint`). The proxy
forwards every request to the agent through its own DEALER. It passes every reply
through `rewrite(reply) -> reply` before sending it back, so a test can turn a real
agent's reply into a malformed one (a wrong dtype, a NaN) at a chosen step.
"""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import zmq

from zmq_proxy import LoopbackProxy


class RewriteProxy(LoopbackProxy):
    """Run the proxy in a thread; use as a context manager to stop it and close its sockets."""

    thread_name = "rewrite-proxy"

    def __init__(self, agent_endpoint: str, rewrite: Callable[[dict], dict]):
        super().__init__(agent_endpoint)
        self.rewrite = rewrite
        self.rewritten = 0                    # replies that `rewrite` changed

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._frontend, zmq.POLLIN)
        poller.register(self._backend, zmq.POLLIN)
        client_identity: bytes | None = None

        while not self._stop.is_set():
            events = dict(poller.poll(20))
            if self._frontend in events:
                client_identity, frame = self._frontend.recv_multipart()
                self._backend.send(frame)
            if self._backend in events and client_identity is not None:
                reply = msgpack.unpackb(self._backend.recv(), raw=False)
                changed = self.rewrite(reply)
                if changed is not reply:
                    self.rewritten += 1
                self._frontend.send_multipart([client_identity, msgpack.packb(changed, use_bin_type=True)])
