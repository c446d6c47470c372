"""Shared plumbing of the test proxies that sit between a coordinator and one agent.

The coordinator connects its DEALER to the proxy's ROUTER (`endpoint`); the proxy
talks to the agent through its own DEALER. Subclasses implement `_run`, the loop
that moves frames between the two sockets until `_stop` is set.
"""

from __future__ import annotations

import threading

import zmq


class LoopbackProxy:
    """Run a proxy loop in a thread; use as a context manager to stop it and close its sockets."""

    thread_name = "proxy"

    def __init__(self, agent_endpoint: str):
        self._context = zmq.Context()
        self._frontend = self._context.socket(zmq.ROUTER)
        self._frontend.setsockopt(zmq.LINGER, 0)
        self._frontend.bind("tcp://127.0.0.1:0")
        self.endpoint = self._frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self._backend = self._context.socket(zmq.DEALER)
        self._backend.setsockopt(zmq.LINGER, 0)
        self._backend.connect(agent_endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._frontend.close(linger=0)
        self._backend.close(linger=0)
        self._context.term()

    def _run(self) -> None:
        raise NotImplementedError
