"""A tiny local stand-in for the W&B backend, for tests.

Standard library only.  It answers just enough of what ``wandb`` 0.31
(``wandb-core``) sends so that a real ``wandb.init(...)`` in ONLINE mode,
``run.log(...)`` and ``run.finish()`` work against ``http://127.0.0.1:PORT``,
and it records every history row that arrives over ``file_stream``.

Point wandb at it with::

    WANDB_MODE=online
    WANDB_BASE_URL=<server.url>
    WANDB_API_KEY=<any 40 character string>
    WANDB_DIR=<a temporary directory>

Modes (switchable at runtime through ``server.mode = ...``):

``ok``
    Answer like a healthy backend.
``hang``
    Accept connections and read requests, but never answer.  A request that
    is hanging is released when the mode changes (it is then answered under
    the new mode) or when the server is stopped (the connection is closed).
``401`` / ``500``
    Answer every request with that HTTP status.
``stall_after_init``
    Like ``ok``, except that ``file_stream`` POSTs hang (as in ``hang``).

What wandb 0.31 sends (observed):

* ``wandb.init``: ``POST /graphql`` ``Viewer`` -- only when wandb prints the
  "Currently logged in as" line (not with ``WANDB_SILENT=true`` or
  ``WANDB_X_DISABLE_VIEWER=true``); each try has its own 5 s timeout that is
  NOT bounded by ``init_timeout`` -- then ``POST /graphql`` ``UpsertBucket``
  (creates the run; retried with backoff on 5xx/timeouts until
  ``init_timeout``; a 401 fails at once).  The Python process also POSTs
  ``/sdk/otel/v1/metrics`` and ``/sdk/otel/v1/logs`` (telemetry proxy; a 404
  disables it, which is what this server answers in ``ok`` mode; the probe
  has a 10 s timeout and runs at interpreter exit).
* during the run: ``POST /files/<entity>/<project>/<run>/file_stream`` with
  ``{"files": {"wandb-history.jsonl": {"offset": N, "content": [...]}, ...}}``.
* ``run.finish``: another ``UpsertBucket``, ``CreateRunFiles`` (upload URLs for
  ``wandb-metadata.json``, ``requirements.txt``, ``config.yaml``,
  ``wandb-summary.json`` ...) followed by ``PUT`` to those URLs, and a final
  ``file_stream`` POST with ``"complete": true, "exitcode": 0``.

Run standalone::

    python tests/fakewandb.py --mode 401
"""

from __future__ import annotations

import argparse
import gzip
import http.server
import json
import select
import signal
import socket
import sys
import threading
import time
import zlib
from typing import Any
from urllib.parse import quote, unquote, urlsplit

MODES = ("ok", "hang", "401", "500", "stall_after_init")

DUMMY_API_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 chars


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    fake: FakeWandb

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients resetting keep-alive connections is normal; stay quiet.
        if getattr(self, "fake", None) is not None and self.fake.verbose:
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fakewandb/1.0"

    def version_string(self) -> str:
        return self.server_version
    server: _Server

    # --- plumbing -----------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.fake.verbose:
            sys.stderr.write("fakewandb: " + (format % args) + "\n")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until empty line
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            body = b"".join(chunks)
        else:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n > 0 else b""
        enc = self.headers.get("Content-Encoding", "").lower()
        try:
            if enc == "gzip":
                body = gzip.decompress(body)
            elif enc == "deflate":
                body = zlib.decompress(body)
        except Exception:  # keep the raw bytes
            pass
        return body

    def _send(self, status: int, payload: Any = None, ctype: str = "application/json") -> None:
        if payload is None:
            data = b""
        elif isinstance(payload, (bytes, bytearray)):
            data = bytes(payload)
        elif isinstance(payload, str):
            data = payload.encode()
        else:
            data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data and self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def _handle(self) -> None:
        fake = self.server.fake
        body = self._read_body()
        path = urlsplit(self.path).path
        fake._log_request(self.command, self.path, body)

        is_file_stream = path.endswith("/file_stream")
        # Hang while the mode says so; a mode change re-evaluates.
        mode = fake._wait_while_hanging(is_file_stream, self.connection)
        if mode is None:  # stopping, or the client gave up: drop it unanswered
            self.close_connection = True
            return

        if mode == "401":
            # Shaped like the real backend's answer to a bad API key.
            self._send(401, {"errors": [{
                "message": "user is not logged in (fakewandb: HTTP 401)",
                "extensions": {"code": "PERMISSION_ERROR"}}], "data": None})
            return
        if mode == "500":
            self._send(500, {"errors": [{
                "message": "fakewandb: HTTP 500 internal server error"}], "data": None})
            return

        # ok (or stall_after_init, outside file_stream)
        if path.startswith("/sdk/otel/"):
            # Telemetry proxy: 404 tells wandb the server has none -> disabled.
            self._send(404, {"error": "not found"})
        elif path.rstrip("/") == "/graphql" or path.endswith("/graphql"):
            self._send(200, fake._graphql(body))
        elif is_file_stream:
            self._send(200, fake._file_stream(path, body))
        elif path.startswith("/storage/"):
            fake._record_upload(path, body)
            self._send(200, b"", ctype="text/plain")
        elif self.command == "GET" and path in ("/", "/healthz", "/ready"):
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": f"fakewandb: unknown path {path}"})

    def _dispatch(self) -> None:
        try:
            self._handle()
        except (ConnectionError, BrokenPipeError, socket.timeout, OSError, ValueError):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch  # noqa: N815


def _peer_closed(conn: socket.socket) -> bool:
    """True if the client has closed (or reset) its end of the connection."""
    try:
        r, _, _ = select.select([conn], [], [], 0)
        if not r:
            return False
        return conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class FakeWandb:
    """Local fake W&B backend.  See the module docstring."""

    def __init__(self, mode: str = "ok", *, host: str = "127.0.0.1", port: int = 0,
                 verbose: bool = False) -> None:
        self._cond = threading.Condition()
        self._mode = "ok"
        self.mode = mode
        self.verbose = verbose
        self._host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._conns: set[socket.socket] = set()
        self._requests: list[dict[str, Any]] = []
        # run_id -> {line_number: row}
        self._history: dict[str, dict[int, dict]] = {}
        self._summary: dict[str, dict] = {}
        self._file_stream_posts: list[dict[str, Any]] = []
        self._exitcodes: dict[str, int | None] = {}
        self._runs: dict[str, dict[str, Any]] = {}
        self._uploads: dict[str, bytes] = {}
        self._lock = threading.Lock()

    # --- mode ---------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        value = str(value)
        if value not in MODES:
            raise ValueError(f"unknown mode {value!r}; expected one of {MODES}")
        with self._cond:
            self._mode = value
            self._cond.notify_all()

    def _wait_while_hanging(self, is_file_stream: bool, conn: socket.socket) -> str | None:
        """Block while the current mode hangs this request.

        Returns the mode to answer under, or None if the server is stopping or
        the client closed the connection while waiting (such a request is
        dropped, never processed, even if the mode later heals).
        """
        with self._cond:
            while True:
                if self._stopped:
                    return None
                mode = self._mode
                if not (mode == "hang" or (mode == "stall_after_init" and is_file_stream)):
                    return mode
                self._cond.wait(0.25)
                if _peer_closed(conn):
                    return None


    # --- lifecycle ----------------------------------------------------------

    def start(self) -> FakeWandb:
        if self._server is not None:
            return self
        self._stopped = False
        srv = _Server((self._host, self._port), _Handler)
        srv.fake = self
        self._server = srv
        self._thread = threading.Thread(
            target=srv.serve_forever, kwargs={"poll_interval": 0.05},
            name="fakewandb", daemon=True,
        )
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeWandb not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment variables that point wandb at this server."""
        env = {
            "WANDB_MODE": "online",
            "WANDB_BASE_URL": self.url,
            "WANDB_API_KEY": DUMMY_API_KEY,
            "WANDB_SILENT": "true",
            # No early Viewer query: it is retried outside init_timeout.
            "WANDB_X_DISABLE_VIEWER": "true",
            "WANDB_DISABLE_GIT": "true",
            "WANDB_DISABLE_CODE": "true",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        env.update(extra)
        return env

    def stop(self) -> None:
        """Stop serving; unblocks hanging handlers and closes connections."""
        srv = self._server
        if srv is None:
            return
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        srv.shutdown()
        srv.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                c.close()
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeWandb:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # --- recorded data ------------------------------------------------------

    def _log_request(self, method: str, path: str, body: bytes) -> None:
        op = None
        if body[:1] == b"{" and path.split("?")[0].endswith("/graphql"):
            try:
                op = json.loads(body).get("operationName")
            except Exception:
                pass
        with self._lock:
            self._requests.append({
                "time": time.time(), "method": method, "path": path,
                "operation": op, "mode": self._mode, "body": body,
            })
        if self.verbose:
            sys.stderr.write(f"fakewandb: [{self._mode}] {method} {path} {op or ''}\n")

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request received, in arrival order."""
        with self._lock:
            return [(r["method"], r["path"]) for r in self._requests]

    def request_log(self) -> list[dict[str, Any]]:
        """Full request log: method, path, GraphQL operation, mode, body, time."""
        with self._lock:
            return [dict(r) for r in self._requests]

    def graphql_operations(self) -> list[str]:
        with self._lock:
            return [r["operation"] or "?" for r in self._requests if r["path"].endswith("/graphql")]

    def history_rows(self, run_id: str | None = None) -> list[dict]:
        """History rows received via file_stream (deduplicated by line offset)."""
        with self._lock:
            runs = [run_id] if run_id is not None else list(self._history)
            out: list[dict] = []
            for r in runs:
                lines = self._history.get(r, {})
                out.extend(lines[i] for i in sorted(lines))
            return out

    def summary(self, run_id: str) -> dict:
        with self._lock:
            return dict(self._summary.get(run_id, {}))

    def exitcode(self, run_id: str) -> int | None:
        """Exit code reported by the final file_stream POST (None if not yet)."""
        with self._lock:
            return self._exitcodes.get(run_id)

    def completed(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._exitcodes

    def file_stream_posts(self, run_id: str | None = None) -> list[dict]:
        with self._lock:
            return [dict(p) for p in self._file_stream_posts
                    if run_id is None or p["run"] == run_id]

    def runs(self) -> dict[str, dict[str, Any]]:
        """Runs created/updated via UpsertBucket, keyed by run id."""
        with self._lock:
            return {k: dict(v) for k, v in self._runs.items()}

    def uploads(self) -> dict[str, bytes]:
        """Files PUT to the upload URLs, keyed by '<entity>/<project>/<run>/<name>'."""
        with self._lock:
            return dict(self._uploads)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._history.clear()
            self._summary.clear()
            self._file_stream_posts.clear()
            self._exitcodes.clear()
            self._runs.clear()
            self._uploads.clear()

    def wait_for(self, predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(interval)
        return bool(predicate())

    # --- protocol -----------------------------------------------------------

    def _file_stream(self, path: str, body: bytes) -> dict:
        # /files/<entity>/<project>/<run>/file_stream
        parts = [unquote(p) for p in path.strip("/").split("/")]
        run_id = parts[-2] if len(parts) >= 2 else "?"
        try:
            data = json.loads(body or b"{}")
        except Exception:
            data = {}
        files = data.get("files") or {}
        with self._lock:
            self._file_stream_posts.append({"run": run_id, "payload": data})
            hist = files.get("wandb-history.jsonl")
            if hist:
                offset = int(hist.get("offset") or 0)
                lines = self._history.setdefault(run_id, {})
                for i, line in enumerate(hist.get("content") or []):
                    try:
                        lines[offset + i] = json.loads(line)
                    except Exception:
                        lines[offset + i] = {"_unparsed": line}
            summ = files.get("wandb-summary.json")
            if summ and summ.get("content"):
                try:
                    self._summary[run_id] = json.loads(summ["content"][-1])
                except Exception:
                    pass
            if data.get("complete"):
                self._exitcodes[run_id] = data.get("exitcode")
        return {"exitcode": None, "limits": {}}

    def _record_upload(self, path: str, body: bytes) -> None:
        key = unquote(path[len("/storage/"):])
        with self._lock:
            self._uploads[key] = body

    def _graphql(self, body: bytes) -> dict:
        try:
            req = json.loads(body or b"{}")
        except Exception:
            return {"errors": [{"message": "fakewandb: bad json"}]}
        op = req.get("operationName") or ""
        q = req.get("query") or ""
        v = req.get("variables") or {}

        if op == "Viewer" or (not op and "viewer" in q):
            return {"data": {"viewer": {
                "id": "VXNlcjox", "entity": "fake-entity", "username": "fake-user",
                "email": "fake@example.com", "admin": False, "flags": "{}",
                "teams": {"edges": [{"node": {"name": "fake-entity"}}]},
            }}}
        if op == "ServerFeaturesQuery" or "serverInfo" in q:
            return {"data": {"serverInfo": {"features": []}}}
        if op == "UpsertBucket":
            name = v.get("name") or v.get("id") or "run"
            project = v.get("project") or "uncategorized"
            entity = v.get("entity") or "fake-entity"
            with self._lock:
                run = self._runs.setdefault(name, {"upserts": 0})
                run.update({k: val for k, val in v.items() if val is not None})
                run["upserts"] += 1
                config = run.get("config") or "{}"
                inserted = run["upserts"] == 1
            return {"data": {"upsertBucket": {
                "bucket": {
                    "id": f"run:{entity}/{project}/{name}", "name": name,
                    "displayName": v.get("displayName") or name,
                    "description": v.get("description"), "config": config,
                    "sweepName": v.get("sweep"),
                    "project": {"id": f"project:{entity}/{project}", "name": project,
                                "entity": {"id": f"entity:{entity}", "name": entity}},
                    "historyLineCount": 0,
                },
                "inserted": inserted,
            }}}
        if op == "RunResumeStatus":
            return {"data": {"model": {
                "id": "project:1", "name": v.get("project") or "uncategorized",
                "entity": {"id": "entity:1", "name": v.get("entity") or "fake-entity"},
                "bucket": None,
            }}}
        if op == "CreateRunFiles":
            entity, project, run = v.get("entity"), v.get("project"), v.get("run")
            base = self.url
            files = [{"name": f, "uploadUrl": f"{base}/storage/{quote(str(entity))}/"
                      f"{quote(str(project))}/{quote(str(run))}/{quote(f)}"}
                     for f in v.get("files") or []]
            return {"data": {"createRunFiles": {
                "runID": f"run:{entity}/{project}/{run}", "uploadHeaders": [], "files": files,
            }}}
        if op == "MarkRunFilesUploaded":
            return {"data": {"markRunFilesUploaded": {"success": True}}}
        if op == "StopRun":
            return {"data": {"stopRun": {"success": True}}}
        if op == "XXHashDigestsEnabled":
            return {"data": {"entity": None}}
        if op == "OrgFeatureFlags":
            return {"data": {"organization": {"featureFlags": []}}}
        # Anything else: an empty, well-formed answer.
        return {"data": {}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a fake W&B backend on 127.0.0.1.")
    p.add_argument("--mode", default="ok", choices=MODES)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true", help="log every request to stderr")
    args = p.parse_args(argv)
    srv = FakeWandb(args.mode, port=args.port, verbose=args.verbose).start()
    print(srv.url, flush=True)
    print(f"# export WANDB_MODE=online WANDB_BASE_URL={srv.url} WANDB_API_KEY={DUMMY_API_KEY}",
          file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.1):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
