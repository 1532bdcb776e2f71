"""The client's background sender: one thread that owns the ZeroMQ socket.

``MetricsClient.log`` only appends to ``outbox`` (a bounded deque, safe to
append to from any thread under the GIL); everything that can wait — packing,
sending, acks, resends, reconnects — happens here, so the train loop never
touches a socket.

Delivery is go-back-N over a DEALER socket:
- every frame has a per-session sequence number and stays in the window
  until the sidecar acknowledges it as durable;
- on (re)connect, on a nack, and when acks stop coming (a retransmission
  timeout with exponential backoff), the client says hello again and resends
  everything unacknowledged, oldest first; the sidecar drops duplicates;
- the buffer is bounded: past ``capacity`` frames the oldest are dropped and
  counted, and the next hello tells the sidecar not to wait for them.

The window holds consecutive sequence numbers only (frames are dropped from
its old end, never from its middle), so a hello's ``first`` is all the
sidecar needs to know about drops. It holds packed bytes, not dicts: a
hundred thousand buffered frames add nothing for the trainer's garbage
collector to walk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import protocol
from .address import ENV_ADDRESS

log = logging.getLogger("kforge_sidecar.client")


@dataclass
class Counters:
    """Written by the sender thread only; read by stats() from any thread."""

    sent: int = 0  # distinct frames handed to ZeroMQ at least once
    acked: int = 0  # frames the sidecar confirmed durable
    dropped: int = 0  # frames lost to a full buffer
    refused: int = 0  # frames the sidecar refused (their seqs are used up, and acknowledged)
    highest_seen: int = 0  # highest seq taken from the outbox


class Transport(threading.Thread):
    RTO_MIN = 2.0  # seconds without ack progress before resending
    RTO_MAX = 30.0
    BUSY_TICK_MS = 5  # how often buffered frames are looked at
    IDLE_TICK_MS = 25
    SLICE = 256  # frames packed or sent per tick, so one tick never holds the GIL long
    HEARTBEAT = 5.0  # an idle client pings this often, so the sidecar knows it is alive
    NO_SIDECAR_WARNING = 5.0  # seconds after the first frame without a welcome: say so, once

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
        self._ack_cond = threading.Condition()
        # The window: packed frames with seqs base, base+1, ...; window[:next]
        # were sent on the current connection and await their ack.
        self._window: deque[bytes] = deque()
        self._base = 1
        self._next = 0
        self._sent_upto = 0
        self._need_hello = True
        self._welcomed = False
        self._last_hello = 0.0
        self._last_send = 0.0
        self._last_progress = time.monotonic()
        self._rto = self.RTO_MIN
        self._warned_drop = False
        self._warned_refused = False
        self._held: tuple[int, object] | None = None  # a staged frame waiting for its device copies
        self._fatal = False
        self.fatal_reason: str | None = None
        self.ever_welcomed = False
        self._first_frame_at: float | None = None  # when the first frame was queued
        self._warned_absent = False

    # ---------------------------------------------------------------- API

    @property
    def buffered(self) -> int:
        return len(self.outbox) + len(self._window) + (self._held is not None)

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
        # bounded window, where they can be counted, dropped and resent.
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
            more = False
            while not self._halt.is_set():
                # poll() releases the GIL. Even with more work waiting, wait a
                # millisecond: a zero wait re-takes the GIL at once and the train
                # loop stalls for whole switch intervals (5 ms) behind us.
                if more:
                    tick = 1
                else:
                    tick = self.BUSY_TICK_MS if (self.outbox or self._window or self._held) else self.IDLE_TICK_MS
                ready = dict(poller.poll(tick))
                if monitor in ready:
                    self._on_monitor(monitor)
                if sock in ready:
                    self._receive(sock)
                more = self._drain_outbox()
                self._bound()
                if not self._fatal:
                    more = self._send(sock) or more
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
                self._welcomed = True
                if not self.ever_welcomed and self._warned_absent:
                    log.warning(
                        "kforge-sidecar client: the sidecar at %s answered; sending the %d buffered frames",
                        self.address, self.buffered,
                    )  # fmt: skip
                self.ever_welcomed = True
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
                elif msg.code == protocol.E_UNKNOWN_SESSION:
                    self._rewind()
                elif msg.code == protocol.E_REFUSED:
                    # That one frame is gone (its seq is used up and will be acked);
                    # the stream goes on.
                    self.counters.refused += 1
                    if not self._warned_refused:
                        self._warned_refused = True
                        log.warning(
                            "kforge-sidecar client: the sidecar refused frame %s (%s); dropped, counted in "
                            "stats().refused, the rest goes on (said once)", msg.seq, msg.reason,
                        )  # fmt: skip
                elif msg.code != protocol.E_DISK:
                    log.warning("kforge-sidecar client: sidecar rejected a frame: %s", msg.reason)

    def _fail(self, reason: str) -> None:
        if not self._fatal:
            self._fatal = True
            self.fatal_reason = reason
            self._on_fatal(reason)
            with self._ack_cond:
                self._ack_cond.notify_all()

    def _ack(self, seq: int) -> None:
        if seq <= self._acked_upto:
            return
        n = min(max(0, seq - self._base + 1), len(self._window))
        for _ in range(n):
            self._window.popleft()
        self._base += n
        self._next = max(0, self._next - n)
        self.counters.acked += n
        with self._ack_cond:
            self._acked_upto = seq
            self._ack_cond.notify_all()
        self._last_progress = time.monotonic()
        self._rto = self.RTO_MIN

    def _rewind(self) -> None:
        """Resend everything unacknowledged, after a fresh hello."""
        self._next = 0
        self._need_hello = True
        self._welcomed = False
        self._last_progress = time.monotonic()

    def _drain_outbox(self) -> bool:
        """Move up to SLICE frames from the outbox into the window; True if more wait.

        An entry that is not bytes is a frame whose device values are still being
        copied (client/device.py): it is held, and everything behind it waits, so
        frames keep their order."""
        c = self.counters
        for _ in range(self.SLICE):
            if self._held is not None:
                seq, frame = self._held
            elif not self.outbox:
                return False
            else:
                seq, frame = self.outbox.popleft()
            if type(frame) is not bytes:
                if not frame.ready():
                    self._held = (seq, frame)
                    return False
                frame = frame.pack()
            self._held = None
            if seq != self._base + len(self._window):
                # The outbox's maxlen pushed frames out: the window must stay
                # consecutive, so what it holds (older still) goes too.
                self._drop_oldest(len(self._window) + seq - c.highest_seen - 1)
                self._base = seq
            c.highest_seen = seq
            self._window.append(frame)
            if self._first_frame_at is None:
                self._first_frame_at = time.monotonic()
        return bool(self.outbox)

    def _bound(self) -> None:
        over = len(self._window) - self.capacity
        if over > 0:
            self._drop_oldest(over)

    def _drop_oldest(self, n: int) -> None:
        """Count ``n`` frames as lost, taking as many of them as it holds off the window's old end."""
        k = min(n, len(self._window))
        for _ in range(k):
            self._window.popleft()
        self._base += k
        self._next = max(0, self._next - k)
        if n <= 0:
            return
        self.counters.dropped += n
        # The sidecar must learn not to wait for the dropped frames.
        self._need_hello = True
        if not self._warned_drop:
            self._warned_drop = True
            log.warning(
                "kforge-sidecar client: buffer full (%d frames); dropping the oldest. "
                "Training is unaffected; MetricsClient.stats() counts what was dropped.",
                self.capacity,
            )

    def _send(self, sock: zmq.Socket) -> bool:
        """Send up to SLICE frames; True if more could be sent right away."""
        now = time.monotonic()
        if (
            not self.ever_welcomed
            and not self._warned_absent
            and self._first_frame_at is not None
            and now - self._first_frame_at > self.NO_SIDECAR_WARNING
        ):
            self._warned_absent = True
            log.warning(
                "kforge-sidecar client: no kforge-sidecar has answered at %s for %.0fs; buffering up to %d "
                "frames until one does (start one with `kforge-sidecar serve` or `kforge-sidecar run -- ...`, "
                "or point %s at it)", self.address, now - self._first_frame_at, self.capacity, ENV_ADDRESS,
            )  # fmt: skip
        if self._next and now - self._last_progress > self._rto:
            log.debug("kforge-sidecar client: no ack for %.1fs; resending %d frames", self._rto, self._next)
            self._rewind()
            self._rto = min(self._rto * 2, self.RTO_MAX)
        elif not self._welcomed and not self._need_hello and now - self._last_hello > self.RTO_MIN:
            self._need_hello = True  # the hello or its answer was lost: say it again
        if self._need_hello:
            if now - self._last_hello < 0.2:
                return False
            first = self._base if self._window else self.counters.highest_seen + 1
            try:
                sock.send(protocol.encode(self._hello(first)), zmq.NOBLOCK)
            except zmq.Again:  # not connected yet
                return False
            self._last_hello = self._last_send = now
            self._need_hello = False
        elif self._welcomed and now - self._last_send > self.HEARTBEAT:
            try:
                sock.send(protocol.encode(protocol.Ping(self.session)), zmq.NOBLOCK)
                self._last_send = now
            except zmq.Again:
                pass
        window = self._window
        for _ in range(self.SLICE):
            if self._next >= len(window):
                return False
            try:
                sock.send(window[self._next], zmq.NOBLOCK)
            except zmq.Again:  # disconnected, or the sidecar is not reading
                return False
            self._next += 1
            self._last_send = now
            seq = self._base + self._next - 1
            if seq > self._sent_upto:
                self._sent_upto = seq
                self.counters.sent += 1
        return self._next < len(window)
