"""The client's background sender: one thread that owns the ZeroMQ socket.

``MetricsClient.log`` only appends to ``outbox`` (a bounded deque, safe to
append to from any thread under the GIL); everything that can wait — packing,
sending, acks, resends, reconnects — happens here, so the train loop never
touches a socket.

Delivery is go-back-N over a DEALER socket:
- every frame has a per-session sequence number and stays in ``inflight``
  until the sidecar acknowledges it as durable;
- on (re)connect, on a nack, and when acks stop coming (a retransmission
  timeout with exponential backoff), the client says hello again and resends
  everything unacknowledged, oldest first; the sidecar drops duplicates;
- the buffer is bounded: past ``capacity`` frames the oldest are dropped and
  counted, and the next hello tells the sidecar not to wait for them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import protocol

log = logging.getLogger("kforge_sidecar.client")

# An item of the outbox: (seq, kind, step, wall time, values) for metrics,
# (seq, "close", exit_code, 0.0, None) for the close request.
OutItem = tuple[int, str, int, float, Any]

_INT64 = (-(2**63), 2**64 - 1)


@dataclass
class Counters:
    """Written by the sender thread only; read by stats() from any thread."""

    sent: int = 0  # distinct frames handed to ZeroMQ at least once
    resent: int = 0  # extra sends after a rewind
    acked: int = 0  # frames the sidecar confirmed durable
    dropped: int = 0  # frames lost to a full buffer or unencodable values
    highest_seen: int = 0  # highest seq taken from the outbox


class Transport(threading.Thread):
    RTO_MIN = 2.0  # seconds without ack progress before resending
    RTO_MAX = 30.0
    BUSY_TICK_MS = 5  # how often a buffered frame is looked at
    IDLE_TICK_MS = 25
    SEND_BATCH = 2000  # sends per tick, so one tick never holds the GIL long

    def __init__(
        self,
        address: str,
        session: str,
        hello: Callable[[int], protocol.Hello],
        outbox: deque,
        capacity: int,
        on_welcome: Callable[[str], None],
        on_fatal: Callable[[str], None],
    ):
        super().__init__(name="kforge-sidecar-client", daemon=True)
        self.address = address
        self.session = session
        self.outbox = outbox
        self.capacity = capacity
        self.counters = Counters()
        self._hello = hello
        self._on_welcome = on_welcome
        self._on_fatal = on_fatal
        self._halt = threading.Event()
        self._acked_upto = 0
        self._sent_upto = 0
        self._ack_cond = threading.Condition()
        # (seq, frame bytes), oldest first; queued = not yet sent on this connection
        self._inflight: deque[tuple[int, bytes]] = deque()
        self._queued: deque[tuple[int, bytes]] = deque()
        self._need_hello = True
        self._last_hello = 0.0
        self._last_progress = time.monotonic()
        self._rto = self.RTO_MIN
        self._warned_drop = False
        self._fatal = False

    # ---------------------------------------------------------------- API

    @property
    def buffered(self) -> int:
        return len(self.outbox) + len(self._queued) + len(self._inflight)

    @property
    def acked_upto(self) -> int:
        return self._acked_upto

    def wait_acked(self, seq: int, timeout: float) -> bool:
        """Wait until every frame up to ``seq`` is durable in the sidecar's spool."""
        deadline = time.monotonic() + timeout
        with self._ack_cond:
            while self._acked_upto < seq and not self._fatal:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._ack_cond.wait(left)
        return self._acked_upto >= seq

    def stop(self, timeout: float) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout)

    # ---------------------------------------------------------------- thread

    def run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        # Bounded close: the trainer must never hang at exit on unsent frames.
        sock.setsockopt(zmq.LINGER, 0)
        # No queueing inside ZeroMQ while disconnected: frames wait in our own
        # bounded buffer, where they can be counted, dropped and resent.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
        try:
            sock.connect(self.address)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            while not self._halt.is_set():
                busy = self.outbox or self._queued or self._inflight
                ready = dict(poller.poll(self.BUSY_TICK_MS if busy else self.IDLE_TICK_MS))
                if monitor in ready:
                    self._on_monitor(monitor)
                if sock in ready:
                    self._receive(sock)
                self._drain_outbox()
                self._bound()
                if not self._fatal:
                    self._send(sock)
        except Exception:  # never let the sender die silently
            log.exception("kforge-sidecar client sender stopped")
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            ctx.term()

    def _on_monitor(self, monitor: zmq.Socket) -> None:
        while True:
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_CONNECTED:
                # A new connection (first one, or a restarted sidecar): what was
                # in flight on the old one may be lost, so start over from hello.
                self._rewind()

    def _receive(self, sock: zmq.Socket) -> None:
        while True:
            try:
                raw = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = protocol.decode_response(raw)
            except protocol.ProtocolError as exc:
                if exc.reason == "version":
                    self._fail(f"sidecar speaks another protocol version ({exc.detail})")
                else:
                    log.warning("kforge-sidecar client: unreadable reply from sidecar: %s", exc)
                continue
            if isinstance(msg, protocol.Welcome):
                self._on_welcome(msg.run_id)
                self._ack(msg.acked)
            elif isinstance(msg, protocol.Ack):
                self._ack(msg.seq)
            elif isinstance(msg, protocol.Nack):
                self._ack(msg.seq)
                self._rewind()
            elif isinstance(msg, protocol.Error):
                if msg.fatal:
                    self._fail(msg.reason)
                elif msg.reason.startswith("unknown session"):
                    self._rewind()
                else:
                    log.warning("kforge-sidecar client: sidecar rejected a frame: %s", msg.reason)

    def _fail(self, reason: str) -> None:
        if not self._fatal:
            self._fatal = True
            self._on_fatal(reason)
            with self._ack_cond:
                self._ack_cond.notify_all()

    def _ack(self, seq: int) -> None:
        if seq <= self._acked_upto:
            return
        n = 0
        for buf in (self._inflight, self._queued):
            while buf and buf[0][0] <= seq:
                buf.popleft()
                n += 1
        self.counters.acked += n
        with self._ack_cond:
            self._acked_upto = seq
            self._ack_cond.notify_all()
        self._last_progress = time.monotonic()
        self._rto = self.RTO_MIN

    def _rewind(self) -> None:
        """Resend everything unacknowledged, after a fresh hello."""
        if self._inflight:
            self.counters.resent += len(self._inflight)
            self._queued.extendleft(reversed(self._inflight))
            self._inflight.clear()
        self._need_hello = True
        self._last_progress = time.monotonic()

    def _drain_outbox(self) -> None:
        c = self.counters
        while self.outbox:
            seq, kind, step, ts, values = self.outbox.popleft()
            if seq != c.highest_seen + 1:  # the deque's maxlen pushed the oldest out
                self._count_drop(seq - c.highest_seen - 1)
            c.highest_seen = seq
            frame = self._pack(seq, kind, step, ts, values)
            if frame is not None:
                self._queued.append((seq, frame))

    def _pack(self, seq: int, kind: str, step: int, ts: float, values: Any) -> bytes | None:
        session = self.session
        if kind == "close":
            return protocol.encode(protocol.Close(session=session, seq=seq, exit_code=step))
        try:
            return protocol.encode_metrics(session, seq, step, kind, ts, values)
        except (OverflowError, TypeError, ValueError):
            bad = [k for k, v in values.items() if type(v) is int and not _INT64[0] <= v <= _INT64[1]]
            for k in bad:
                log.warning("kforge-sidecar client: dropping %r=%r at step %d: integer out of range", k, values[k], step)
            try:
                return protocol.encode_metrics(session, seq, step, kind, ts, {k: v for k, v in values.items() if k not in bad})
            except (OverflowError, TypeError, ValueError) as exc:
                log.warning("kforge-sidecar client: dropping step %d: cannot encode (%s)", step, exc)
                self._count_drop(1)
                return None

    def _bound(self) -> None:
        over = len(self._inflight) + len(self._queued) - self.capacity
        if over <= 0:
            return
        for buf in (self._inflight, self._queued):
            while over > 0 and buf:
                buf.popleft()
                over -= 1
                self._count_drop(1)
        # The sidecar must learn not to wait for the dropped frames.
        self._need_hello = True

    def _count_drop(self, n: int) -> None:
        self.counters.dropped += n
        if not self._warned_drop:
            self._warned_drop = True
            log.warning(
                "kforge-sidecar client: buffer full (%d frames) or frames unencodable; dropping the "
                "oldest. Training is unaffected; MetricsClient.stats() counts what was dropped.",
                self.capacity,
            )

    def _send(self, sock: zmq.Socket) -> None:
        now = time.monotonic()
        if self._inflight and now - self._last_progress > self._rto:
            log.debug("kforge-sidecar client: no ack for %.1fs; resending %d frames", self._rto, len(self._inflight))
            self._rewind()
            self._rto = min(self._rto * 2, self.RTO_MAX)
        if self._need_hello:
            if now - self._last_hello < 0.2:
                return
            first = (self._inflight or self._queued or [(self.counters.highest_seen + 1, b"")])[0][0]
            try:
                sock.send(protocol.encode(self._hello(first)), zmq.NOBLOCK)
            except zmq.Again:  # not connected yet
                return
            self._last_hello = now
            self._need_hello = False
        c = self.counters
        for _ in range(self.SEND_BATCH):
            if not self._queued:
                break
            seq, frame = self._queued[0]
            try:
                sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:  # disconnected, or the sidecar is not reading
                break
            self._queued.popleft()
            self._inflight.append((seq, frame))
            if seq > self._sent_upto:
                self._sent_upto = seq
                c.sent += 1
