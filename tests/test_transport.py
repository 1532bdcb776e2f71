"""The sender's delivery paths against a stand-in sidecar (a ROUTER socket in a thread).

The stand-in does what the receiver does with a part: splits it into frames with
msgpack.Unpacker, validates each alone, stores consecutive seqs, acknowledges,
nacks a gap and moves its seq on a hello whose ``first`` says frames were dropped.
It offers batches or not, so both of the client's paths are checked without the
real sidecar taking batches."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import msgpack
import pytest
import zmq
from conftest import wait_for

from client import MetricsClient, protocol
from client.transport import Transport


@dataclass
class Seen:
    parts: list[int] = field(default_factory=list)  # frames per part
    part_bytes: list[int] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)  # seqs stored, in order
    hellos: list[int] = field(default_factory=list)  # each hello's first
    duplicates: int = 0
    nacks: int = 0
    bad: list[str] = field(default_factory=list)


class FakeSidecar(threading.Thread):
    def __init__(self, address: str, batch: int, hold_acks: threading.Event | None = None):
        super().__init__(daemon=True)
        self.address, self.batch, self.hold_acks = address, batch, hold_acks
        self.seen = Seen()
        self.seq = 0
        self.stop_event = threading.Event()
        self.bound = threading.Event()

    def run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.address)
        self.bound.set()
        session = None
        ident = None
        acked = 0
        try:
            while not self.stop_event.is_set():
                if sock.poll(10):
                    ident, raw = sock.recv_multipart()
                    session = self.handle(sock, ident, raw) or session
                if ident is not None and session and self.seq > acked and not self.holding():
                    acked = self.seq
                    sock.send_multipart([ident, protocol.encode(protocol.Ack(session, acked))])
        finally:
            sock.close()
            ctx.term()

    def holding(self) -> bool:
        return self.hold_acks is not None and not self.hold_acks.is_set()

    def handle(self, sock: zmq.Socket, ident: bytes, raw: bytes) -> str | None:
        s = self.seen
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(raw)
        bounds, start = [], 0
        for _ in unpacker:
            bounds.append((start, unpacker.tell()))
            start = unpacker.tell()
        frames = [protocol.decode_request(raw[a:b]) for a, b in bounds]  # each frame valid alone
        if isinstance(frames[0], protocol.Hello):
            if len(frames) != 1:
                s.bad.append("a hello travelled in a batch")
            hello = frames[0]
            s.hellos.append(hello.first)
            self.seq = max(self.seq, hello.first - 1)
            welcome = protocol.Welcome(hello.session, hello.run_id or "fake", self.seq, self.batch)
            sock.send_multipart([ident, protocol.encode(welcome)])
            return hello.session
        s.parts.append(len(frames))
        s.part_bytes.append(len(raw))
        if len(frames) > 1 and len(raw) > self.batch:
            s.bad.append(f"a batch of {len(raw)} bytes, over {self.batch}")
        for f in frames:
            if f.seq <= self.seq:
                s.duplicates += 1
            elif f.seq > self.seq + 1:
                s.nacks += 1
                sock.send_multipart([ident, protocol.encode(protocol.Nack(f.session, self.seq))])
                break
            else:
                self.seq = f.seq
                s.stored.append(f.seq)
        return None


@pytest.fixture
def fake(tmp_path):
    made: list[FakeSidecar] = []

    def start(batch: int, hold_acks: threading.Event | None = None) -> FakeSidecar:
        f = FakeSidecar(f"ipc://{tmp_path}/fake.sock", batch, hold_acks)
        f.start()
        f.bound.wait(5)
        made.append(f)
        return f

    yield start
    for f in made:
        f.stop_event.set()
        f.join(5)


def _log(mc: MetricsClient, steps: range) -> None:
    for step in steps:
        mc.log({f"m{i}": step + i / 10 for i in range(14)}, step=step)


@pytest.mark.parametrize("batch", [0, 4096, 1024 * 1024])
def test_every_frame_arrives_once_in_order_in_batches_or_alone(fake, batch):
    f = fake(batch)
    mc = MetricsClient(address=f.address, rank=0)
    wait_for(lambda: mc._transport.ever_welcomed, 10, what="welcome")  # before it, one frame per part
    _log(mc, range(1, 3001))
    assert mc.close(timeout=20) is True
    s = f.seen
    assert s.stored == list(range(1, 3002)) and s.bad == [] and s.nacks == 0  # + the close frame
    st = mc.stats()
    assert (st.sent, st.acked, st.buffered, st.dropped) == (3001, 3001, 0, 0)
    if batch:
        assert len(s.parts) < 3001 / 8, "frames travel in batches once offered"
        assert max(s.part_bytes) <= batch
    else:
        assert set(s.parts) == {1}, "one frame per part without the sidecar's offer"


def test_overflow_drops_only_what_does_not_fit_and_never_rewinds(fake, monkeypatch):
    """Acks held back while the trainer logs 3x its buffer: the sent frames that left
    the window count as acked once their ack comes; the unsent ones that did not fit
    are dropped, the sidecar told by a hello at once; nothing is sent twice."""
    monkeypatch.setattr(Transport, "INFLIGHT_MAX", 50)
    hold = threading.Event()
    f = fake(4096, hold)
    mc = MetricsClient(address=f.address, buffer_size=100, rank=0)
    wait_for(lambda: f.seen.hellos, 10, what="hello")
    _log(mc, range(1, 301))
    time.sleep(0.2)
    hold.set()
    assert mc.close(timeout=20) is True
    s, st = f.seen, mc.stats()
    assert s.bad == [] and s.duplicates == 0 and s.nacks == 0
    assert st.dropped > 0 and st.acked + st.dropped == 301 and st.buffered == 0
    assert len(s.stored) == st.acked  # exactly what was not dropped arrived
    assert s.stored == sorted(s.stored) and s.stored[-100:] == list(range(202, 302))  # the newest 100 + close
    gaps = [(a, b) for a, b in zip(s.stored, s.stored[1:]) if b != a + 1]
    assert all(b in s.hellos for _, b in gaps), (gaps, s.hellos)  # each gap announced by a hello


def test_no_sidecar_then_one_comes_the_newest_arrive(fake, tmp_path):
    address = f"ipc://{tmp_path}/fake.sock"
    mc = MetricsClient(address=address, buffer_size=500, rank=0)
    _log(mc, range(1, 2001))
    wait_for(lambda: mc.stats().dropped == 1500, 10, what="the oldest dropped")
    f = fake(1024 * 1024)
    assert mc.flush(timeout=20) is True
    assert f.seen.stored == list(range(1501, 2001)) and f.seen.hellos[-1] == 1501
    assert (mc.stats().acked, mc.stats().dropped) == (500, 1500)
    assert mc.close(timeout=20) is True


def test_close_and_flush_wake_the_sender_at_once(fake, monkeypatch):
    monkeypatch.setattr(Transport, "IDLE_TICK_MS", 5000)  # ticks far apart: only a wake-up is quick
    monkeypatch.setattr(Transport, "BUSY_TICK_MS", 5000)
    f = fake(1024 * 1024)
    mc = MetricsClient(address=f.address, rank=0)
    wait_for(lambda: mc._transport.ever_welcomed, 10, what="welcome")
    _log(mc, range(1, 11))
    t0 = time.perf_counter()
    assert mc.flush(10)
    time.sleep(0.1)  # the sender is idle, in its longest poll
    assert mc.close(timeout=10) is True
    assert time.perf_counter() - t0 < 2.5  # neither waited for a tick
    assert f.seen.stored == list(range(1, 12))


def test_frames_waiting_in_the_outbox_count_against_the_buffer_before_anything_is_sent():
    """A burst that stops at its deadline with frames still in the outbox must not send
    window frames that those newer frames push out: the whole buffer keeps the newest."""
    outbox: deque = deque(maxlen=100)
    t = Transport("ipc:///nonexistent/kfs.sock", "s" * 16, None, outbox, 100, None, None)  # not started
    frames = {s: protocol.encode(protocol.Close("s" * 16, s)) for s in range(1, 301)}
    t.outbox = outbox = deque(frames.items(), maxlen=1000)  # as if the sender had fallen behind
    t._drain_outbox(deadline=0)  # one bulk, then out of time
    t._bound()
    assert t._end - t._base == 0 and t.counters.dropped == Transport.CHUNK_FRAMES and t._tell_drop
    while outbox:
        t._drain_outbox(deadline=0)
        t._bound()
    assert (t._base, t._end, t.counters.dropped, t.buffered) == (201, 301, 200, 100)
    held = {}
    for c in t._chunks:  # a chunk's frames below base (acked or dropped) may stay until all of it goes
        for i, end in enumerate(c.ends):
            held[c.first + i] = c.data[c.ends[i - 1] if i else 0 : end]
    assert {s: held[s] for s in range(t._base, t._end)} == {s: frames[s] for s in range(201, 301)}
    t.close_wake_pipe()


def test_bare_metrics_frames_that_the_outbox_pushed_out_are_counted_and_the_rest_kept_in_order():
    """log() queues metrics frames bare; the sender reads their seqs in place. When the
    outbox's maxlen pushed some out, the window keeps what follows them, consecutive, and
    counts the lost ones as dropped; the rare other messages still come as (seq, frame)."""
    session = "s" * 16
    outbox: deque = deque(maxlen=100)
    t = Transport("ipc:///nonexistent/kfs.sock", session, None, outbox, 1000, None, None)  # not started
    frames = {s: protocol.encode_metrics(session, s, s, "train", 0.0, {"loss": float(s)}) for s in range(1, 151)}
    outbox.extend(frames[s] for s in range(1, 121))  # 1-20 pushed out before the sender looked
    frames[121] = protocol.encode(protocol.Close(session, 121))
    outbox.append((121, frames[121]))  # a (seq, frame) pair among the bare frames
    outbox.extend(frames[s] for s in range(122, 151))  # and 21-50 pushed out behind them
    assert len(outbox) == 100 and outbox[70] == (121, frames[121])
    while outbox:
        t._drain_outbox(deadline=0)
    assert (t._base, t._end, t.counters.dropped) == (51, 151, 50)
    held = {}
    for c in t._chunks:
        for i, end in enumerate(c.ends):
            held[c.first + i] = c.data[c.ends[i - 1] if i else 0 : end]
    assert {s: held[s] for s in range(t._base, t._end)} == {s: frames[s] for s in range(51, 151)}
    t.close_wake_pipe()


def test_log_leaves_nothing_for_the_garbage_collector():
    """A queued step must not count toward the trainer's next garbage collection: in a
    process that imported torch a full collection walks hundreds of thousands of objects,
    and the call that triggers it (ours, or the train loop's next allocation) waits."""
    import gc

    mc = MetricsClient(address="ipc:///nonexistent/kforge-gc.sock", buffer_size=10_000, rank=0)
    mc._transport.stop(5)  # no sender: every frame stays queued, as in a backlog
    values = {f"k{i}": float(i) for i in range(14)}
    for step in range(100):
        mc.log(values, step=step)  # warm: key caches and the like
    gc.disable()
    try:
        before = gc.get_count()[0]
        for step in range(100, 5100):
            mc.log(values, step=step)
        grown = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert len(mc._outbox) == 5100
    assert grown < 50, f"5000 queued steps left {grown} objects for the collector"
    mc.close(timeout=0)
