"""The client's background sender: one thread that owns the ZeroMQ socket.

``MetricsClient.log`` only appends to ``outbox`` (a bounded deque, safe to
append to from any thread under the GIL) its packed metrics frames, bare, and
the other messages as (seq, frame) pairs; everything that can wait — packing,
sending, acks, resends, reconnects — happens here, so the train loop never
touches a socket.

Delivery is go-back-N over a DEALER socket:
- every frame has a per-session sequence number and stays in the window
  until the sidecar acknowledges it as durable;
- on (re)connect, on a nack, and when acks stop coming (a retransmission
  timeout with exponential backoff), the client says hello again and resends
  everything unacknowledged, oldest first; the sidecar drops duplicates;
- the buffer is bounded: past ``capacity`` frames the oldest leave the
  window. One already sent is not lost yet: it counts as acked when its ack
  comes (as dropped if the connection fails first). One never sent is dropped
  and counted, and a hello goes out ahead of the next frame to tell the sidecar
  not to wait for it; nothing is resent, and the sidecar keeps working through
  what is queued for it meanwhile.

The window holds consecutive sequence numbers only (frames leave its old end,
never its middle), so a hello's ``first`` is all the sidecar needs to know
about drops. It holds packed bytes in *chunks*: consecutive frames joined
into one bytes object with an array of their end offsets. A hundred thousand
buffered frames are a few hundred objects, nothing for the trainer's garbage
collector to walk, and cost little more than their bytes. Once the sidecar's
welcome offers batches, a chunk travels as one ZeroMQ part (a batch, see
protocol.py); before that, one frame per part.

The GIL: while this thread runs Python, the train loop waits for it, and a
thread that wants the GIL back waits for a real pause of the holder (a
blocking call), not a brief release. So every burst of work here is bounded
in time (``BURST``) and ends in a real wait, and the per-frame work is done by
C loops (bulk pops, ``b"".join``, one send per batch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from array import array
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
from itertools import accumulate, islice, repeat, starmap
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


class _Chunk:
    """Frames ``first``, ``first + 1``, ... packed back to back: frame ``first + i``
    is ``data[ends[i - 1]:ends[i]]`` (from 0 for the first)."""

    __slots__ = ("first", "data", "ends")

    def __init__(self, first: int, data: bytes, ends: array):
        self.first, self.data, self.ends = first, data, ends

    @property
    def stop(self) -> int:
        """One past the last seq it holds."""
        return self.first + len(self.ends)


class Transport(threading.Thread):
    RTO_MIN = 2.0  # seconds without ack progress before resending
    RTO_MAX = 30.0
    BUSY_TICK_MS = 5  # how often buffered frames are looked at
    IDLE_TICK_MS = 25
    BURST = 0.0002  # seconds of work between two real waits, so the train loop never waits long for the GIL
    PAUSE = 0.0002  # the real wait between two bursts while more work is ready
    CHUNK_FRAMES = 64  # frames moved from the outbox in one bulk (a unit of a burst's work)
    SEND_RUN = 16  # frames sent one per part between two looks at the clock
    MERGE_BELOW = 32 * 1024  # a chunk smaller than this takes the next frames in (few, large chunks)
    INFLIGHT_MAX = 4096  # frames sent, not yet acked: what may wait in ZeroMQ, here and in the sidecar
    HELLO_AGAIN = 0.2  # seconds between two hellos that restart the stream (reconnects, nacks)
    DROP_HELLO_EVERY = 0.05  # seconds between two hellos that announce drops: each costs the sidecar a config decode
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
        self.outbox = outbox  # metrics frames (bytes), or (seq, frame) pairs for the others
        self._seq_at = protocol.metrics_seq_offset(session)
        self.capacity = capacity
        self.counters = Counters()
        self._hello = hello
        self._on_welcome = on_welcome
        self._on_fatal = on_fatal
        self._halt = threading.Event()
        self._acked_upto = 0
        self._ack_cond = threading.Condition()
        # The window: seqs base .. end-1, in chunks; seqs below ``_cursor`` were sent
        # on the current connection and await their ack. ``_ci``: the chunk holding
        # the cursor (len(chunks) when it is at the end).
        self._chunks: deque[_Chunk] = deque()
        self._base = 1
        self._end = 1
        self._cursor = 1
        self._ci = 0
        self._sent_upto = 0
        # Sent frames that left the window over capacity: [lo, hi] ranges, oldest
        # first, waiting for the ack that confirms them.
        self._gone: deque[list[int]] = deque()
        self._gone_n = 0
        self._batch = 0  # the largest batch part the sidecar takes (its welcome); 0: one frame per part
        self._need_hello = True  # the stream restarts: hello, then everything unacknowledged
        self._tell_drop = False  # unsent frames were dropped: a hello says so, at once
        self._welcomed = False
        self._last_hello = 0.0
        self._last_send = 0.0
        self._last_progress = time.monotonic()
        self._rto = self.RTO_MIN
        self._warned_drop = False
        self._warned_refused = False
        # Taken from the outbox but behind a staged frame still waiting for its device copies.
        self._held: list[tuple[int, object]] = []
        self._fatal = False
        self.fatal_reason: str | None = None
        self.ever_welcomed = False
        self._first_frame_at: float | None = None  # when the first frame was queued
        self._warned_absent = False
        # close()/flush()/stop() wake the sender through this pipe; log() never does.
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # ---------------------------------------------------------------- API

    @property
    def buffered(self) -> int:
        return len(self.outbox) + len(self._held) + (self._end - self._base) + self._gone_n

    def unnoticed_drops(self, last_seq: int) -> int:
        """Frames up to ``last_seq`` that the outbox's maxlen pushed out before this thread
        took them (it counts them in ``dropped`` once it notices the gap)."""
        return max(0, last_seq - self.counters.highest_seen - len(self.outbox) - len(self._held))

    def wake(self) -> None:
        """Have the sender look at its work now rather than at its next tick."""
        with self._wake_lock:
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, b"w")
                except OSError:  # full: it is awake already
                    pass

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
        self.wake()
        if self.is_alive():
            self.join(timeout)

    def close_wake_pipe(self, locked: bool = True) -> None:
        """``locked=False`` only in a forked child, where no other thread exists (and a
        lock held at the fork would never be released)."""
        with self._wake_lock if locked else contextlib.nullcontext():
            if self._wake_w >= 0:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1

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
            poller.register(self._wake_r, zmq.POLLIN)
            more = False
            clock = time.perf_counter
            while not self._halt.is_set():
                if more:
                    # A real wait, however short: a poll that returns at once re-takes
                    # the GIL before the train loop can, which then waits a whole
                    # switch interval (5 ms) behind us.
                    time.sleep(self.PAUSE)
                    tick = 0
                else:
                    busy = self.outbox or self._end > self._base or self._held or self._gone_n
                    tick = self.BUSY_TICK_MS if busy else self.IDLE_TICK_MS
                ready = dict(poller.poll(tick))
                # One deadline for the whole burst, replies included: the train loop
                # waits for all of it when it wants the GIL back. A stage whose turn
                # comes after the deadline waits for the next burst (each stage that
                # runs does at least one unit of work, so one unit each would add up).
                deadline = clock() + self.BURST
                if self._wake_r in ready:
                    self._drain_wake()
                if monitor in ready:
                    self._on_monitor(monitor)
                more = sock in ready and self._receive(sock, deadline)
                more = (self._drain_outbox(deadline) if clock() < deadline else bool(self.outbox)) or more
                self._bound()
                if not self._fatal:
                    more = (self._send(sock, deadline) if clock() < deadline else self._sendable()) or more
        except Exception:  # never let the sender die silently
            log.exception("kforge-sidecar client sender stopped")
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            ctx.term()
            self.close_wake_pipe()

    def _drain_wake(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except OSError:
            pass

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

    def _receive(self, sock: zmq.Socket, deadline: float) -> bool:
        """The sidecar's replies, until none is left (False) or ``deadline`` (True: more may wait)."""
        clock = time.perf_counter
        while True:
            if clock() > deadline:
                return True
            try:
                raw = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return False
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
                self._batch = msg.batch
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
        c = self.counters
        gone = self._gone
        while gone and gone[0][0] <= seq:  # sent frames that left the window: delivered after all
            lo, hi = gone[0]
            k = min(seq, hi) - lo + 1
            c.acked += k
            self._gone_n -= k
            if seq >= hi:
                gone.popleft()
            else:
                gone[0][0] = seq + 1
        n = min(max(0, seq - self._base + 1), self._end - self._base)
        if n:
            self._forget(n)
            c.acked += n
        with self._ack_cond:
            self._acked_upto = seq
            self._ack_cond.notify_all()
        self._last_progress = time.monotonic()
        self._rto = self.RTO_MIN

    def _forget(self, n: int) -> None:
        """Take the ``n`` oldest frames off the window (acked or dropped)."""
        self._base += n
        chunks = self._chunks
        while chunks and chunks[0].stop <= self._base:
            chunks.popleft()
            self._ci -= 1
        if self._cursor < self._base:
            self._cursor = self._base
            self._ci = 0
        elif self._ci < 0:
            self._ci = 0

    def _rewind(self) -> None:
        """Resend everything unacknowledged, after a fresh hello."""
        if self._gone_n:
            # Sent, then out of the window, and this connection may have lost them:
            # dropped (the hello's ``first`` tells the sidecar not to wait for them).
            self.counters.dropped += self._gone_n
            self._gone.clear()
            self._gone_n = 0
        self._cursor = self._base
        self._ci = 0
        self._need_hello = True
        self._welcomed = False
        self._batch = 0  # perhaps another sidecar now: one frame per part until it says otherwise
        self._last_progress = time.monotonic()

    # ---------------------------------------------------------------- outbox -> window

    def _drain_outbox(self, deadline: float) -> bool:
        """Move frames from the outbox into the window until ``deadline``; True if more wait.

        An entry that is not bytes is a frame whose device values are still being
        copied (client/device.py): it is held, and everything behind it waits, so
        frames keep their order."""
        if self._held:
            held, self._held = self._held, []
            self._admit(held)
            if self._held:
                return False
        outbox, at = self.outbox, self._seq_at
        clock = time.perf_counter
        while outbox:
            # Only this thread pops, so n entries are there; the pops run in C, in one go.
            n = min(len(outbox), self.CHUNK_FRAMES)
            entries = list(starmap(outbox.popleft, repeat((), n)))
            if set(map(type, entries)) == {bytes}:  # log()'s metrics frames, queued bare
                first = protocol.metrics_seq(entries[0], at)
                # seqs only grow in the outbox: first and last tell whether the maxlen pushed any out
                if first == self._end and protocol.metrics_seq(entries[-1], at) - first == n - 1:
                    self._append(first, entries)  # the common case: consecutive, all packed
                    if clock() > deadline:
                        break
                    continue
            self._admit([(protocol.metrics_seq(e, at), e) if type(e) is bytes else e for e in entries])
            if self._held:
                return False
            if clock() > deadline:
                break
        return bool(outbox)

    def _admit(self, items: list) -> None:
        """The careful path: packs staged frames, holds a frame not ready (and what
        follows it), and handles seqs the outbox's maxlen pushed out."""
        run: list[bytes] = []
        run_first = 0
        for i, (seq, frame) in enumerate(items):
            if type(frame) is not bytes:
                if not frame.ready():
                    self._held = items[i:]
                    break
                frame = frame.pack()
            if seq != (run_first + len(run) if run else self._end):
                # The outbox's maxlen pushed frames out: the window must stay
                # consecutive, so what it holds (older still) goes too.
                if run:
                    self._append(run_first, run)
                    run = []
                self._evict(self._end - self._base, missing=seq - self._end)
                self._base = self._end = self._cursor = seq
                self._ci = len(self._chunks)
            if not run:
                run_first = seq
            run.append(frame)
        if run:
            self._append(run_first, run)

    def _append(self, first: int, frames: tuple[bytes, ...] | list[bytes]) -> None:
        chunks = self._chunks
        last = chunks[-1] if chunks else None
        if last is not None and len(last.data) < self.MERGE_BELOW and last.stop == first:
            last.ends.extend(islice(accumulate(map(len, frames), initial=len(last.data)), 1, None))
            last.data = b"".join((last.data, *frames))
        else:
            chunks.append(_Chunk(first, b"".join(frames), array("I", accumulate(map(len, frames)))))
        self._end = first + len(frames)
        self.counters.highest_seen = self._end - 1
        if self._first_frame_at is None:
            self._first_frame_at = time.monotonic()

    # ---------------------------------------------------------------- the bound

    def _bound(self) -> None:
        """Keep the newest ``capacity`` frames of the whole buffer. Frames still in the
        outbox are newer than the window's: counting them here drops the window's
        oldest before they are sent, not after (a burst that stopped at its deadline
        would otherwise send frames the next one drops)."""
        held = self._end - self._base
        over = held + len(self.outbox) + len(self._held) - self.capacity
        if over > 0:
            self._evict(min(over, held))

    def _evict(self, n: int, missing: int = 0) -> None:
        """Take the ``n`` oldest frames off the window, over capacity; ``missing``
        more (newer) never reached it. Sent ones may still arrive; the rest are lost."""
        inflight = min(n, self._cursor - self._base)
        if inflight > 0:
            lo = self._base
            if self._gone and self._gone[-1][1] == lo - 1:
                self._gone[-1][1] = lo + inflight - 1
            else:
                self._gone.append([lo, lo + inflight - 1])
            self._gone_n += inflight
        else:
            inflight = 0
        self._forget(n)
        lost = n - inflight + missing
        if lost <= 0:
            return
        self.counters.dropped += lost
        # The sidecar must learn not to wait for them, before the next frame reaches it.
        self._tell_drop = True
        if not self._warned_drop:
            self._warned_drop = True
            log.warning(
                "kforge-sidecar client: buffer full (%d frames); dropping the oldest. "
                "Training is unaffected; MetricsClient.stats() counts what was dropped.",
                self.capacity,
            )

    # ---------------------------------------------------------------- window -> socket

    def _send(self, sock: zmq.Socket, deadline: float) -> bool:
        """Send from the cursor on, until ``deadline``; True if more could be sent right away."""
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
        inflight = self._cursor - self._base + self._gone_n
        if inflight and now - self._last_progress > self._rto:
            log.debug("kforge-sidecar client: no ack for %.1fs; resending %d frames", self._rto, inflight)
            self._rewind()
            self._rto = min(self._rto * 2, self.RTO_MAX)
        elif not self._welcomed and not self._need_hello and now - self._last_hello > self.RTO_MIN:
            self._need_hello = True  # the hello or its answer was lost: say it again
        if self._need_hello or self._tell_drop:
            if now - self._last_hello < (self.HELLO_AGAIN if self._need_hello else self.DROP_HELLO_EVERY):
                return False
            try:
                sock.send(protocol.encode(self._hello(self._base)), zmq.NOBLOCK)
            except zmq.Again:  # not connected yet, or the sidecar is not reading
                return False
            self._last_hello = self._last_send = now
            self._need_hello = self._tell_drop = False
        elif self._welcomed and now - self._last_send > self.HEARTBEAT:
            try:
                sock.send(protocol.encode(protocol.Ping(self.session)), zmq.NOBLOCK)
                self._last_send = now
            except zmq.Again:
                pass
        clock = time.perf_counter
        while self._cursor < self._end:
            room = self._room()
            if room <= 0:
                return False  # the acks will wake us
            chunk = self._cursor_chunk()
            j = self._cursor - chunk.first
            k = self._send_batch(sock, chunk, j, room) if self._batch else self._send_frames(sock, chunk, j, room)
            if k == j:
                return False  # disconnected, or the sidecar is not reading
            self._cursor += k - j
            if k == len(chunk.ends):
                self._ci += 1
            if self._cursor - 1 > self._sent_upto:
                self.counters.sent += self._cursor - 1 - max(self._sent_upto, chunk.first + j - 1)
                self._sent_upto = self._cursor - 1
            self._last_send = now
            if clock() > deadline:
                break
        return self._cursor < self._end

    def _room(self) -> int:
        """Frames that may still be sent before the in-flight limit."""
        return self.INFLIGHT_MAX - (self._cursor - self._base) - self._gone_n

    def _sendable(self) -> bool:
        """Whether ``_send`` has frames to send now: for a burst whose deadline came before
        its send stage, so that the next burst follows at once only if it has work (hellos
        and pings are on timers; the poll tick serves them)."""
        return self._cursor < self._end and self._room() > 0

    def _cursor_chunk(self) -> _Chunk:
        chunks, seq = self._chunks, self._cursor
        if self._ci < len(chunks):
            chunk = chunks[self._ci]
            if chunk.first <= seq < chunk.stop:
                return chunk
        for i, chunk in enumerate(chunks):  # lost track (a drop or an ack moved it): look
            if seq < chunk.stop:
                self._ci = i
                return chunk
        raise AssertionError(f"seq {seq} is not in the window")

    def _send_batch(self, sock: zmq.Socket, chunk: _Chunk, j: int, room: int) -> int:
        """Frames j.. of ``chunk`` as one part (as many as the sidecar's batch size takes);
        the index after the last frame sent."""
        ends = chunk.ends
        start = ends[j - 1] if j else 0
        k = min(max(bisect_right(ends, start + self._batch, j), j + 1), j + room)  # a big frame goes alone
        part = chunk.data if j == 0 and k == len(ends) else memoryview(chunk.data)[start : ends[k - 1]]
        try:
            sock.send(part, zmq.NOBLOCK)
        except zmq.Again:
            return j
        return k

    def _send_frames(self, sock: zmq.Socket, chunk: _Chunk, j: int, room: int) -> int:
        """Frames j.. of ``chunk``, one per part, at most ``SEND_RUN`` (a bound on the
        burst); the index after the last frame sent."""
        ends, view, send, noblock = chunk.ends, memoryview(chunk.data), sock.send, zmq.NOBLOCK
        start = ends[j - 1] if j else 0
        k = j
        try:
            for stop in ends[j : min(len(ends), j + room, j + self.SEND_RUN)]:
                send(view[start:stop], noblock)
                start = stop
                k += 1
        except zmq.Again:
            pass
        return k
