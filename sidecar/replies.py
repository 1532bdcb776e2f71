"""Reply routing: what the receiver answers, and when it may leave.

An ack or a welcome says "durable": it waits for the next group commit, and goes
only if that commit succeeded for its run (commit.py). Every other reply (an
error, a nack, a control reply) waits for the next commit too, so that replies
leave in the order they were decided; ``send_now`` is for the commit itself.
"""

from __future__ import annotations

import msgpack
import zmq

from client import protocol

from .runstate import Session


class Outbox:
    def __init__(self, batch: int = 0) -> None:
        self.batch = batch  # offered in every welcome: the largest batch part the receiver takes
        self._replies: list[tuple[bytes, bytes]] = []  # (identity, frame), in order
        self.acks: dict[str, Session] = {}  # sessions owed an ack, by session id
        self.welcomes: dict[str, Session] = {}  # sessions owed a welcome (a hello's answer)
        self._refusals: list[tuple[Session, bytes]] = []  # E_REFUSED errors: they go before their ack

    @property
    def pending(self) -> bool:
        return bool(self.acks or self.welcomes or self._replies or self._refusals)

    def send(self, identity: bytes, msg: protocol.Response) -> None:
        """A reply that leaves with the next commit."""
        self._replies.append((identity, protocol.encode(msg)))

    def refused(self, sess: Session, msg: protocol.Error) -> None:
        """A refused frame's error: it leaves with the ack that covers the frame, and before
        it, so the client hears why before it sees the frame acknowledged."""
        self._refusals.append((sess, protocol.encode(msg)))

    def ack(self, sess: Session) -> None:
        self.acks[sess.session] = sess

    def welcome(self, sess: Session) -> None:
        self.welcomes[sess.session] = sess

    def flush(self, sock: zmq.Socket, failed: set[str]) -> None:
        """After a commit: refusals, welcomes and acks to the sessions of runs whose commit
        succeeded (``failed``: run IDs whose write or fsync failed, owed nothing; a refused
        frame is refused again when it comes again), then every other reply."""
        for sess in list(self.welcomes.values()) + list(self.acks.values()):
            if sess.run_id not in failed:
                sess.durable = sess.seq
        refusals, self._refusals = self._refusals, []
        for sess, frame in refusals:
            if sess.run_id not in failed and sess.identity is not None:
                route(sock, sess.identity, frame)
        for sess in self.welcomes.values():
            if sess.run_id not in failed and sess.identity is not None:
                send_now(sock, sess.identity, protocol.Welcome(sess.session, sess.run_id, sess.durable, self.batch))
        for sess in self.acks.values():
            if sess.run_id not in failed and sess.identity is not None and sess.session not in self.welcomes:
                route(sock, sess.identity, _ack(sess.session, sess.durable))
        self.welcomes.clear()
        self.acks.clear()
        replies, self._replies = self._replies, []
        for identity, frame in replies:
            route(sock, identity, frame)


def _ack(session: str, seq: int) -> bytes:
    """``protocol.encode(Ack(session, seq))``, the same bytes, without asdict (one per session per commit)."""
    return msgpack.packb({"session": session, "seq": seq, "t": "ack", "v": protocol.PROTOCOL_VERSION})


def send_now(sock: zmq.Socket, identity: bytes, msg: protocol.Response) -> None:
    route(sock, identity, protocol.encode(msg))


def route(sock: zmq.Socket, identity: bytes, frame: bytes) -> None:
    try:
        sock.send_multipart([identity, frame], zmq.NOBLOCK)
    except (zmq.Again, zmq.ZMQError):
        # the peer is gone or not reading: its resend timer covers a lost reply
        pass
