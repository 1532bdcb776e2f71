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

Resume and rewind (wandb-core 0.31, ``core/internal/runbranch``):

* ``wandb.init(id=..., resume="allow"|"must")`` first sends ``RunResumeStatus``.
  The fake answers it from its own record of the run (``bucket`` is None for
  a run it never saw): ``historyLineCount``/``eventsLineCount``/
  ``logLineCount`` (the highest line offset + 1 it holds for
  ``wandb-history.jsonl``/``wandb-events.jsonl``/``output.log``),
  ``historyTail``/``eventsTail`` (a JSON string of a list of the last raw
  lines, each a JSON string), ``summaryMetrics`` (the last
  ``wandb-summary.json`` it got), ``config`` (the last UpsertBucket config),
  ``wandbConfig(keys: ["t"])`` (``{"t": ...}`` from that config's ``_wandb``:
  without a "t" wandb-core treats the run as not started and does not
  resume), ``tags``, ``notes``.  wandb-core then starts file_stream at those
  line counts and the run at the last history line's ``_step`` + 1
  (``run.starting_step``), so the resumed lines append after the old ones.
  ``UpsertBucket`` answers the run's ``historyLineCount`` too.
* ``wandb.init(resume_from="<id>?_step=N")`` sends the ``RewindRun``
  mutation.  By default the fake answers as a server without the rewind
  feature (self-managed W&B) does: a GraphQL validation error, HTTP 200 (see
  ``rewind_refusal_status``), ``{"errors": [{"message": "Cannot query field
  \"rewindRun\" on type \"Mutation\".", "locations": [...]}]}``; wandb.init
  then raises ``wandb.errors.CommError('failed to rewind run: input:3:2:
  Cannot query field "rewindRun" on type "Mutation".\n')``.  With
  ``FakeWandb(rewind=True)`` it rewinds: history is cut to the lines up to
  the last one with ``_step <= N``, the summary is recomputed from them, and
  the answer's ``rewoundRun.historyLineCount`` makes the client append after
  them, starting at step N + 1.  Like W&B cloud it refuses to rewind a run
  that is not in a terminal state (HTTP 400, see ``crash_run``).

Run standalone::

    python -m devtools.fakewandb --mode 401
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

HISTORY_FILE = "wandb-history.jsonl"
EVENTS_FILE = "wandb-events.jsonl"
OUTPUT_FILE = "output.log"
SUMMARY_FILE = "wandb-summary.json"
# How many trailing lines RunResumeStatus returns in historyTail/eventsTail
# (wandb-core only reads the last one).
TAIL_LINES = 10

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
            self._send(
                401,
                {
                    "errors": [
                        {
                            "message": "user is not logged in (fakewandb: HTTP 401)",
                            "extensions": {"code": "PERMISSION_ERROR"},
                        }
                    ],
                    "data": None,
                },
            )
            return
        if mode == "500":
            self._send(500, {"errors": [{"message": "fakewandb: HTTP 500 internal server error"}], "data": None})
            return

        # ok (or stall_after_init, outside file_stream)
        if path.startswith("/sdk/otel/"):
            # Telemetry proxy: 404 tells wandb the server has none -> disabled.
            self._send(404, {"error": "not found"})
        elif path.rstrip("/") == "/graphql" or path.endswith("/graphql"):
            answer = fake._graphql(body)
            status, payload = answer if isinstance(answer, tuple) else (200, answer)
            self._send(status, payload)
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

    def __init__(
        self,
        mode: str = "ok",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = False,
        rewind: bool = False,
        rewind_refusal_status: int = 200,
    ) -> None:
        self._cond = threading.Condition()
        self._mode = "ok"
        self.mode = mode
        self.verbose = verbose
        # False: refuse RewindRun like a server without the rewind feature
        # (self-managed W&B).  True: rewind like W&B cloud.  Switchable at runtime.
        self.rewind = rewind
        # HTTP status of that refusal: 200 is what a GraphQL server (W&B's
        # self-managed one included) answers to a validation error; 400 lets a
        # test see how wandb reports a refusal that comes as an HTTP error.
        self.rewind_refusal_status = rewind_refusal_status
        self._host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._conns: set[socket.socket] = set()
        self._requests: list[dict[str, Any]] = []
        # run_id -> {line_number: row}
        self._history: dict[str, dict[int, dict]] = {}
        # run_id -> file name -> {line_number: raw line}, every file_stream file
        # (wandb-history.jsonl, wandb-events.jsonl, output.log, ...)
        self._lines: dict[str, dict[str, dict[int, str]]] = {}
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
            target=srv.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fakewandb",
            daemon=True,
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
            self._requests.append(
                {
                    "time": time.time(),
                    "method": method,
                    "path": path,
                    "operation": op,
                    "mode": self._mode,
                    "body": body,
                }
            )
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
            return [dict(p) for p in self._file_stream_posts if run_id is None or p["run"] == run_id]

    def runs(self) -> dict[str, dict[str, Any]]:
        """Runs created/updated via UpsertBucket (or add_run), keyed by run id."""
        with self._lock:
            return {k: dict(v) for k, v in self._runs.items()}

    def uploads(self) -> dict[str, bytes]:
        """Files PUT to the upload URLs, keyed by '<entity>/<project>/<run>/<name>'."""
        with self._lock:
            return dict(self._uploads)

    def add_run(
        self,
        run_id: str,
        rows: Any = (),
        *,
        entity: str | None = None,
        project: str | None = None,
        config: dict | None = None,
        summary: dict | None = None,
        exitcode: int | None = 0,
    ) -> None:
        """Put a run on the server as if a wandb process had logged it.

        So a test can resume (or rewind) a run without running a first wandb
        process.  ``rows`` become history lines 0.. (``_step`` defaults to the
        line number), ``config`` is the user config (wandb's telemetry key is
        added so that wandb-core treats the run as started), ``summary``
        defaults to the rows merged (the last value of each key), and
        ``exitcode`` None leaves the run without a final file_stream: still
        running for the server, as when its uploader died a moment ago (see
        ``crash_run``).  With ``entity``/``project`` given, resuming
        the run from another entity/project does not find it.  Replaces any
        record of ``run_id``.
        """
        history: dict[int, dict] = {}
        raw: dict[int, str] = {}
        for i, row in enumerate(rows):
            row = dict(row)
            row.setdefault("_step", i)
            history[i] = row
            raw[i] = json.dumps(row)
        if summary is None:
            summary = {}
            for row in history.values():
                summary.update(row)
        cfg: dict[str, Any] = {k: {"value": val} for k, val in (config or {}).items()}
        cfg["_wandb"] = {"value": {"t": {}}}
        run: dict[str, Any] = {"upserts": 0, "name": run_id, "config": json.dumps(cfg)}
        if entity is not None:
            run["entity"] = entity
        if project is not None:
            run["project"] = project
        with self._lock:
            self._runs[run_id] = run
            self._history[run_id] = history
            self._lines[run_id] = {HISTORY_FILE: raw}
            self._summary[run_id] = dict(summary)
            self._exitcodes.pop(run_id, None)
            if exitcode is not None:
                self._exitcodes[run_id] = exitcode

    def crash_run(self, run_id: str) -> None:
        """Mark a run crashed, as the server does once its heartbeats stop.

        The run becomes terminal (``completed()`` is True, ``exitcode()``
        None), so that ``rewind=True`` rewinds it.
        """
        with self._lock:
            self._exitcodes[run_id] = None

    def line_counts(self, run_id: str) -> dict[str, int]:
        """Lines the server holds per file_stream file (what a resume continues after)."""
        with self._lock:
            return {name: self._count(run_id, name) for name in self._lines.get(run_id, {})}

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._history.clear()
            self._lines.clear()
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

    # --- runs as the server knows them --------------------------------------
    # (all of these expect self._lock to be held)

    def _count(self, run_id: str, name: str) -> int:
        """Lines of a file_stream file: its highest line offset + 1."""
        lines = self._lines.get(run_id, {}).get(name) or {}
        return max(lines) + 1 if lines else 0

    def _tail(self, run_id: str, name: str) -> str:
        """The last lines of a file, as the JSON string of a list of strings."""
        lines = self._lines.get(run_id, {}).get(name) or {}
        return json.dumps([lines[i] for i in sorted(lines)[-TAIL_LINES:]])

    def _run_fields(self, name: str, entity: str | None, project: str | None) -> dict:
        """The run fields UpsertBucket and RewindRun answer with."""
        run = self._runs.get(name) or {}
        entity = run.get("entity") or entity or "fake-entity"
        project = run.get("project") or project or "uncategorized"
        return {
            "id": f"run:{entity}/{project}/{name}",
            "name": name,
            "displayName": run.get("displayName") or name,
            "description": run.get("description"),
            "config": run.get("config") or "{}",
            "sweepName": run.get("sweep"),
            "project": {
                "id": f"project:{entity}/{project}",
                "name": project,
                "entity": {"id": f"entity:{entity}", "name": entity},
            },
            "historyLineCount": self._count(name, HISTORY_FILE),
        }

    def _resume_bucket(self, name: str, entity: str, project: str) -> dict | None:
        """RunResumeStatus's ``bucket``: None for a run this server never saw.

        wandb-core resumes only when ``wandbConfig(keys: ["t"])`` has a "t"
        (the run has started: its config carries wandb's telemetry); it then
        takes the file_stream offsets from the three line counts (each must be
        non-null), the starting step from the last ``historyTail`` line's
        ``_step`` (+ 1 when historyLineCount > 0), the summary from
        ``summaryMetrics`` and merges ``config`` (values as {"value": v}).
        """
        run = self._runs.get(name)
        if run is None and name not in self._lines:
            return None
        run = run or {}
        if run.get("project") not in (None, project) or run.get("entity") not in (None, entity):
            return None
        config = run.get("config") or "{}"
        try:
            wandb_cfg = (json.loads(config).get("_wandb") or {}).get("value") or {}
        except Exception:
            wandb_cfg = {}
        bucket = self._run_fields(name, entity, project)
        return {
            "id": bucket["id"],
            "name": name,
            "summaryMetrics": json.dumps(self._summary.get(name) or {}),
            "displayName": bucket["displayName"],
            "logLineCount": self._count(name, OUTPUT_FILE),
            "historyLineCount": self._count(name, HISTORY_FILE),
            "eventsLineCount": self._count(name, EVENTS_FILE),
            "historyTail": self._tail(name, HISTORY_FILE),
            "eventsTail": self._tail(name, EVENTS_FILE),
            "config": config,
            "tags": list(run.get("tags") or []),
            "notes": run.get("notes"),
            "wandbConfig": json.dumps({k: wandb_cfg[k] for k in ("t",) if k in wandb_cfg}),
        }

    def _rewind_run(self, v: dict) -> dict | tuple[int, dict]:
        """RewindRun on a server with rewind: keep history up to the rewind point.

        Only a run in a terminal state can be rewound: one that has had its
        final file_stream post (``completed()``), was put there by
        ``add_run`` with an exit code, or was marked by ``crash_run``.
        The history becomes the lines up to the last one whose metric is <=
        the value (renumbered from 0), the summary is recomputed from them, and
        the answer carries the new historyLineCount, which wandb-core uses as
        the history file_stream offset.
        """
        name = v.get("runName") or ""
        metric = v.get("metricName") or "_step"
        value = v.get("metricValue")
        with self._lock:
            if name not in self._runs and name not in self._lines:
                return 404, {
                    "errors": [{"message": "run not found", "path": ["rewindRun"]}],
                    "data": {"rewindRun": None},
                }
            if name not in self._exitcodes:
                # W&B cloud's answer for a run still running (wandb/wandb#10438).
                return 400, {
                    "data": {"rewindRun": None},
                    "errors": [
                        {"message": "cannot rewind a run that is not in a terminal state", "path": ["rewindRun"]}
                    ],
                }
            raw = self._lines.get(name, {}).get(HISTORY_FILE) or {}
            rows = self._history.get(name, {})
            order = sorted(raw)
            keep = 0
            for n, i in enumerate(order):
                got = rows.get(i, {}).get(metric)
                if isinstance(got, (int, float)) and value is not None and got <= value:
                    keep = n + 1
            kept = order[:keep]
            self._lines.setdefault(name, {})[HISTORY_FILE] = {n: raw[i] for n, i in enumerate(kept)}
            self._history[name] = {n: rows[i] for n, i in enumerate(kept) if i in rows}
            summary: dict = {}
            for n in range(len(kept)):
                summary.update(self._history[name].get(n, {}))
            self._summary[name] = summary
            bucket = self._run_fields(name, v.get("entity"), v.get("project"))
        return {"data": {"rewindRun": {"rewoundRun": bucket}}}

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
            for name, chunk in files.items():
                if name == SUMMARY_FILE or not isinstance(chunk, dict):
                    continue
                # A line's offset is its line number in the file: a resent
                # offset replaces that line, a resumed client appends after
                # the line counts RunResumeStatus reported.
                offset = int(chunk.get("offset") or 0)
                raw = self._lines.setdefault(run_id, {}).setdefault(name, {})
                for i, line in enumerate(chunk.get("content") or []):
                    raw[offset + i] = line
                    if name == HISTORY_FILE:
                        try:
                            row = json.loads(line)
                        except Exception:
                            row = {"_unparsed": line}
                        self._history.setdefault(run_id, {})[offset + i] = row
            summ = files.get(SUMMARY_FILE)
            if summ and summ.get("content"):
                try:
                    self._summary[run_id] = json.loads(summ["content"][-1])
                except Exception:
                    pass
            if data.get("complete"):
                self._exitcodes[run_id] = data.get("exitcode")
        return {"exitcode": None, "limits": {}}

    def _record_upload(self, path: str, body: bytes) -> None:
        key = unquote(path[len("/storage/") :])
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
            return {
                "data": {
                    "viewer": {
                        "id": "VXNlcjox",
                        "entity": "fake-entity",
                        "username": "fake-user",
                        "email": "fake@example.com",
                        "admin": False,
                        "flags": "{}",
                        "teams": {"edges": [{"node": {"name": "fake-entity"}}]},
                    }
                }
            }
        if op == "ServerFeaturesQuery" or "serverInfo" in q:
            return {"data": {"serverInfo": {"features": []}}}
        if op == "UpsertBucket":
            name = v.get("name") or v.get("id") or "run"
            with self._lock:
                inserted = name not in self._runs
                run = self._runs.setdefault(name, {"upserts": 0})
                run.update({k: val for k, val in v.items() if val is not None})
                run["upserts"] += 1
                bucket = self._run_fields(name, v.get("entity"), v.get("project"))
            bucket["description"] = v.get("description")
            bucket["displayName"] = v.get("displayName") or bucket["displayName"]
            return {"data": {"upsertBucket": {"bucket": bucket, "inserted": inserted}}}
        if op == "RunResumeStatus":
            entity = v.get("entity") or "fake-entity"
            project = v.get("project") or "uncategorized"
            with self._lock:
                bucket = self._resume_bucket(v.get("name") or "", entity, project)
            return {
                "data": {
                    "model": {
                        "id": f"project:{entity}/{project}",
                        "name": project,
                        "entity": {"id": f"entity:{entity}", "name": entity},
                        "bucket": bucket,
                    }
                }
            }
        if op == "RewindRun" or "rewindRun" in q:
            if not self.rewind:
                return self.rewind_refusal_status, _unknown_field_error(q, "rewindRun", "Mutation")
            return self._rewind_run(v)
        if op == "CreateRunFiles":
            entity, project, run = v.get("entity"), v.get("project"), v.get("run")
            base = self.url
            files = [
                {
                    "name": f,
                    "uploadUrl": f"{base}/storage/{quote(str(entity))}/"
                    f"{quote(str(project))}/{quote(str(run))}/{quote(f)}",
                }
                for f in v.get("files") or []
            ]
            return {
                "data": {
                    "createRunFiles": {
                        "runID": f"run:{entity}/{project}/{run}",
                        "uploadHeaders": [],
                        "files": files,
                    }
                }
            }
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


def _unknown_field_error(query: str, field: str, type_name: str) -> dict:
    """What a GraphQL server answers to a query for a field its schema lacks.

    A validation error: HTTP 200, an ``errors`` list and no ``data`` (the
    GraphQL spec).  W&B's self-managed server answers an unknown field this
    way: in wandb/wandb#10124 (wandb/local in docker) ``wandb.Api().runs()``
    raised ``Exception: {'message': 'Cannot query field "internalId" on type
    "Project".', 'locations': [{'line': 3, 'column': 5}]}``, which wandb's
    Python GraphQL client raised from the ``errors`` of a 2xx answer only (it
    called ``raise_for_status()`` first).  Its resolver errors, by contrast,
    come with 4xx/5xx (wandb/wandb#10438: ``returned error 400:
    {"data":{"rewindRun":null},"errors":[{"message":"cannot rewind a run that
    is not in a terminal state","path":["rewindRun"]}]}``).
    """
    idx = max(query.find(field), 0)
    line = query.count("\n", 0, idx) + 1
    column = idx - (query.rfind("\n", 0, idx) + 1) + 1
    return {
        "errors": [
            {
                "message": f'Cannot query field "{field}" on type "{type_name}".',
                "locations": [{"line": line, "column": column}],
            }
        ]
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a fake W&B backend on 127.0.0.1.")
    p.add_argument("--mode", default="ok", choices=MODES)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true", help="log every request to stderr")
    p.add_argument(
        "--rewind", action="store_true", help="implement RewindRun (default: refuse it like self-managed W&B)"
    )
    args = p.parse_args(argv)
    srv = FakeWandb(args.mode, port=args.port, verbose=args.verbose, rewind=args.rewind).start()
    print(srv.url, flush=True)
    print(
        f"# export WANDB_MODE=online WANDB_BASE_URL={srv.url} WANDB_API_KEY={DUMMY_API_KEY}",
        file=sys.stderr,
        flush=True,
    )
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
