"""A ZeroMQ proxy between one coordinator and one agent that can hold back a step reply.

The coordinator connects its DEALER to the proxy's ROUTER (`endpoint`). The proxy
forwards every request to the agent through its own DEALER, and every reply back. When
`hold_step` is set, the agent's reply to that step is held until the coordinator's
request for the next step passes through the proxy, which only happens after the
coordinator gave up waiting for the held reply. Replies keep their order, so the
replies after the held one wait behind it. This makes an agent miss the per-step
deadline for exactly one step without depending on how long anything takes.

With `release_on_next_step=False` the held reply (and every reply after it) waits
`max_hold_s`, which simulates an agent that hangs, or until a test calls `release()`.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import msgpack
import zmq

from zmq_proxy import LoopbackProxy


class DelayProxy(LoopbackProxy):
    """Run the proxy in a thread; use as a context manager to stop it and close its sockets."""

    thread_name = "delay-proxy"

    def __init__(self, agent_endpoint: str, hold_step: int | None = None, max_hold_s: float = 30.0,
                 release_on_next_step: bool = True):
        super().__init__(agent_endpoint)
        self.hold_step = hold_step
        self.max_hold_s = max_hold_s
        self.release_on_next_step = release_on_next_step
        self.held_replies: list[int] = []       # step numbers of replies that were held
        self._release = threading.Event()
        self._released = threading.Event()

    def release(self, timeout_s: float = 5.0) -> None:
        """Forward the held reply now, and return once the proxy has sent it on."""
        self._release.set()
        if not self._released.wait(timeout_s):
            raise TimeoutError(f"the proxy did not forward its held reply within {timeout_s:g} s")

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._frontend, zmq.POLLIN)
        poller.register(self._backend, zmq.POLLIN)
        client_identity: bytes | None = None
        queue: deque[bytes] = deque()          # replies not yet forwarded, in order
        holding_since: float | None = None     # set while the head of `queue` is held

        while not self._stop.is_set():
            events = dict(poller.poll(20))
            if self._frontend in events:
                client_identity, frame = self._frontend.recv_multipart()
                request = msgpack.unpackb(frame, raw=False)
                next_step = request.get("op") == "step" and request.get("step") == self.hold_step + 1
                if holding_since is not None and next_step and self.release_on_next_step:
                    holding_since = None
                self._backend.send(frame)
            if self._backend in events:
                frame = self._backend.recv()
                reply = msgpack.unpackb(frame, raw=False)
                if (self.hold_step is not None and reply.get("op") == "step"
                        and reply.get("step") == self.hold_step and not self.held_replies):
                    self.held_replies.append(self.hold_step)
                    holding_since = time.monotonic()
                queue.append(frame)
            if holding_since is not None and time.monotonic() - holding_since > self.max_hold_s:
                holding_since = None
            if holding_since is not None and self._release.is_set():
                holding_since = None
            while queue and holding_since is None and client_identity is not None:
                self._frontend.send_multipart([client_identity, queue.popleft()])
            if self._release.is_set() and self.held_replies and holding_since is None and not queue:
                self._released.set()
