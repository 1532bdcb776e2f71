"""Control requests to a running sidecar (``status``, ``stop``), for the CLI and the launcher.

The server answers them itself (server.py, ``Server.control``); they travel on the same
socket as the clients' frames (a ``control`` message, client/protocol.py).
"""

from __future__ import annotations

import time

import zmq

from client import protocol
from client.address import ipc_path


class ControlRefused(Exception):
    """The sidecar answered with an error instead of a reply."""


def request(address: str, what: str, timeout: float) -> dict | None:
    """Send a control request (``status``, ``stop``) to a running sidecar; its reply's body,
    or None if none answers in time. Raises ControlRefused if the sidecar refuses it."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # No IMMEDIATE: with it (and LINGER 0) the pipe is torn down when the sidecar disconnects,
    # and a reply not yet read goes with it; `stop` lost the reply to "stop" that way, as the
    # sidecar closes its socket right after sending it. Without it, an unanswered request just
    # waits out the timeout.
    try:
        sock.connect(address)
        deadline = time.monotonic() + timeout
        sent = False
        while time.monotonic() < deadline:
            if not sent:
                try:
                    sock.send(protocol.encode(protocol.Control(t=what)), zmq.NOBLOCK)
                    sent = True
                except zmq.Again:  # not connected (yet)
                    time.sleep(0.02)
                    continue
            if sock.poll(50):
                msg = protocol.decode_response(sock.recv())
                if isinstance(msg, protocol.Reply):
                    return msg.body
                if isinstance(msg, protocol.Error):
                    raise ControlRefused(f"sidecar refused the request: {msg.reason}")
        return None
    finally:
        sock.close(linger=0)
        ctx.term()


def serving(address: str, timeout: float = 2.0) -> dict | None:
    """The ``sidecar`` part of the status of whoever serves ``address``, or None."""
    path = ipc_path(address)
    if path is not None and not path.exists():
        return None  # nothing bound there: no need to wait for an answer
    try:
        body = request(address, "status", timeout)
    except Exception:  # something answered, but not a sidecar we can talk to
        return None
    return (body or {}).get("sidecar")
