"""Tests for devtools/fakewandb.py: a real wandb (online mode) against the fake.

Every wandb run happens in a subprocess with a hard deadline, so a wandb
hang can never hang the test session.  Nothing but 127.0.0.1 is contacted.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from devtools.fakewandb import FakeWandb

pytest.importorskip("wandb")

ENTITY = "fake-entity"
PROJECT = "fake-project"

# The script run in the subprocess.  It prints exactly one "RESULT {...}" line.
SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    params = json.loads(sys.argv[1])
    t0 = time.monotonic()
    res = {}
    import wandb
    settings = wandb.Settings(
        init_timeout=params["init_timeout"],
        finish_timeout=params["finish_timeout"],
        finish_timeout_raises=True,
        x_disable_stats=True,
        console="off",
    )
    try:
        run = wandb.init(entity=params["entity"], project=params["project"],
                         settings=settings, **params["init_kwargs"])
    except BaseException as e:
        res.update(init="error", exc_type=type(e).__name__,
                   exc_module=type(e).__module__, exc=str(e))
    else:
        res.update(init="ok", run_id=run.id, starting_step=run.starting_step,
                   resumed=run.resumed, config=dict(run.config))
        steps = params["steps"] or [None] * len(params["rows"])
        for row, step in zip(params["rows"], steps):
            run.log(row, step=step)
        try:
            run.finish()
            res["finish"] = "ok"
        except BaseException as e:
            res.update(finish="error", finish_exc_type=type(e).__name__,
                       finish_exc=str(e))
    res["elapsed"] = time.monotonic() - t0
    print("RESULT " + json.dumps(res), flush=True)
    if params.get("fast_exit"):
        # wandb's atexit telemetry flush probes <base_url>/sdk/otel/v1/metrics
        # with a 10 s HTTP timeout; against a hanging server that adds ~20 s
        # to process exit.  Skip it: the result is already reported.
        sys.stdout.flush()
        os._exit(0)
    """
)

ROWS = [
    {"loss": 1.0, "acc": 0.25},
    {"loss": 0.5, "acc": 0.5},
    {"loss": 0.125, "acc": 0.75},
]


@pytest.fixture
def server():
    srv = FakeWandb("ok").start()
    try:
        yield srv
    finally:
        srv.stop()


def run_wandb(
    srv: FakeWandb,
    tmp_path: Path,
    *,
    init_timeout: float,
    finish_timeout: float = 10.0,
    rows=ROWS,
    fast_exit: bool = False,
    deadline: float = 30.0,
    init_kwargs: dict | None = None,
    steps: list[int] | None = None,
) -> dict:
    """Run SCRIPT in a subprocess against ``srv``; return its RESULT dict.

    ``init_kwargs`` go to ``wandb.init`` (id, resume, resume_from ...);
    ``steps`` are the explicit ``step=`` of each row (default: wandb's own).
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "wandb_script.py"
    script.write_text(SCRIPT)
    wdir = tmp_path / "wandb_dir"
    wdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        srv.env(
            WANDB_DIR=str(wdir),
            WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
            WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
            WANDB_DATA_DIR=str(tmp_path / "wandb_data"),
        )
    )
    params = {
        "entity": ENTITY,
        "project": PROJECT,
        "rows": rows,
        "init_timeout": init_timeout,
        "finish_timeout": finish_timeout,
        "fast_exit": fast_exit,
        "init_kwargs": init_kwargs or {},
        "steps": steps,
    }
    proc = subprocess.Popen(
        [sys.executable, str(script), json.dumps(params)],
        env=env,
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        proc.kill()  # by its own pid
        out, err = proc.communicate()
        pytest.fail(f"wandb subprocess exceeded {deadline}s\nstdout:\n{out}\nstderr:\n{err[-3000:]}")
    for line in out.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT ") :])
            res["_stderr"] = err
            res["_rc"] = proc.returncode
            return res
    pytest.fail(f"no RESULT line (rc={proc.returncode})\nstdout:\n{out}\nstderr:\n{err[-3000:]}")


def _fmt(res: dict) -> str:
    return (
        json.dumps({k: v for k, v in res.items() if k != "_stderr"}, indent=1)
        + "\n--- stderr tail ---\n"
        + res.get("_stderr", "")[-2000:]
    )


def _logged(rows: list[dict]) -> list[dict]:
    """Only the user keys + _step of history rows (drop _runtime/_timestamp)."""
    return [{k: v for k, v in r.items() if k not in ("_runtime", "_timestamp", "_wandb")} for r in rows]


# --- with a real wandb -------------------------------------------------------


def test_ok_init_log_finish_rows_arrive(server, tmp_path):
    res = run_wandb(server, tmp_path, init_timeout=15, finish_timeout=15)
    assert res["init"] == "ok", _fmt(res)
    assert res["finish"] == "ok", _fmt(res)
    assert res["_rc"] == 0, _fmt(res)
    run_id = res["run_id"]

    expected = [dict(row, _step=i) for i, row in enumerate(ROWS)]
    assert _logged(server.history_rows(run_id)) == expected
    assert _logged(server.history_rows()) == expected
    assert server.exitcode(run_id) == 0
    assert server.summary(run_id)["loss"] == 0.125

    ops = server.graphql_operations()
    assert "UpsertBucket" in ops, ops
    assert ("POST", f"/files/{ENTITY}/{PROJECT}/{run_id}/file_stream") in server.requests()
    assert server.runs()[run_id]["project"] == PROJECT
    assert any(k.endswith("/wandb-metadata.json") for k in server.uploads())


def test_401_init_fails_fast_with_auth_error(server, tmp_path):
    server.mode = "401"
    res = run_wandb(server, tmp_path, init_timeout=15)
    assert res["init"] == "error", _fmt(res)
    assert res["exc_type"] == "CommError", _fmt(res)
    assert "401" in res["exc"] and "not logged in" in res["exc"], _fmt(res)
    assert server.history_rows() == []
    assert server.graphql_operations().count("UpsertBucket") == 1  # no retries


def test_500_init_fails_after_retrying_until_init_timeout(server, tmp_path):
    server.mode = "500"
    res = run_wandb(server, tmp_path, init_timeout=6, deadline=30)
    assert res["init"] == "error", _fmt(res)
    assert res["exc_type"] == "CommError", _fmt(res)
    assert "500" in res["exc"] and "init_timeout" in res["exc"], _fmt(res)
    # wandb-core retried the run upsert (exponential backoff) until init_timeout.
    assert server.graphql_operations().count("UpsertBucket") >= 2
    assert server.history_rows() == []


def test_hang_init_times_out(server, tmp_path):
    server.mode = "hang"
    res = run_wandb(server, tmp_path, init_timeout=5, fast_exit=True, deadline=30)
    assert res["init"] == "error", _fmt(res)
    assert res["exc_type"] == "CommError", _fmt(res)
    assert "Timed out" in res["exc"] or "deadline" in res["exc"], _fmt(res)
    assert server.requests(), "wandb never reached the server"
    assert server.history_rows() == []


def test_stall_after_init_finish_times_out_without_rows(server, tmp_path):
    server.mode = "stall_after_init"
    res = run_wandb(server, tmp_path, init_timeout=15, finish_timeout=3, deadline=30)
    assert res["init"] == "ok", _fmt(res)
    assert res["finish"] == "error", _fmt(res)
    assert res["finish_exc_type"] == "TimeoutError", _fmt(res)
    run_id = res["run_id"]
    assert any(p.endswith(f"/{run_id}/file_stream") for _, p in server.requests())
    assert server.history_rows(run_id) == []
    assert not server.completed(run_id)


def test_mode_switch_heals_500_during_init(server, tmp_path):
    server.mode = "500"
    stop = threading.Event()

    def heal() -> None:
        # Heal once wandb has had a 500 (not after a fixed delay: starting
        # the interpreter and importing wandb alone can take over 2 s).
        while not stop.is_set():
            if any(r["mode"] == "500" for r in server.request_log()):
                server.mode = "ok"
                return
            stop.wait(0.05)

    healer = threading.Thread(target=heal, daemon=True)
    healer.start()
    try:
        res = run_wandb(server, tmp_path, init_timeout=20, finish_timeout=15)
    finally:
        stop.set()
        healer.join(5)
    assert res["init"] == "ok", _fmt(res)
    assert res["finish"] == "ok", _fmt(res)
    log = server.request_log()
    assert log[0]["mode"] == "500"
    expected = [dict(row, _step=i) for i, row in enumerate(ROWS)]
    assert _logged(server.history_rows(res["run_id"])) == expected


# --- resume: a second process continues a run the server holds --------------

RUN_ID = "resume01"


def _steps_and_x(rows: list[dict]) -> list[tuple]:
    return [(r.get("_step"), r.get("x")) for r in rows]


@pytest.mark.parametrize("resume,explicit_steps", [("allow", False), ("must", True)])
def test_resume_continues_after_the_last_step(server, tmp_path, resume, explicit_steps):
    first = run_wandb(
        server,
        tmp_path / "first",
        init_timeout=15,
        finish_timeout=15,
        init_kwargs={"id": RUN_ID},
        rows=[{"x": i} for i in range(10)],
    )
    assert first["init"] == "ok" and first["finish"] == "ok", _fmt(first)
    assert first["starting_step"] == 0 and first["resumed"] is False, _fmt(first)
    assert server.line_counts(RUN_ID)["wandb-history.jsonl"] == 10
    posts_before = len(server.file_stream_posts(RUN_ID))

    # A second process, with its own wandb dir: all it knows comes from the server.
    second = run_wandb(
        server,
        tmp_path / "second",
        init_timeout=15,
        finish_timeout=15,
        init_kwargs={"id": RUN_ID, "resume": resume},
        rows=[{"x": i} for i in range(10, 15)],
        steps=list(range(10, 15)) if explicit_steps else None,
    )
    assert second["init"] == "ok" and second["finish"] == "ok", _fmt(second)
    assert second["run_id"] == RUN_ID
    assert second["starting_step"] == 10 and second["resumed"] is True, _fmt(second)

    # Nothing overwritten: the resumed lines come after the first attempt's.
    assert _steps_and_x(server.history_rows(RUN_ID)) == [(i, i) for i in range(15)]
    offsets = [
        p["payload"]["files"]["wandb-history.jsonl"]["offset"]
        for p in server.file_stream_posts(RUN_ID)[posts_before:]
        if "wandb-history.jsonl" in (p["payload"].get("files") or {})
    ]
    assert offsets and min(offsets) == 10, offsets
    assert server.summary(RUN_ID)["x"] == 14 and server.summary(RUN_ID)["_step"] == 14
    assert server.exitcode(RUN_ID) == 0
    assert "RunResumeStatus" in server.graphql_operations()


def test_resume_a_run_put_on_the_server_by_add_run(server, tmp_path):
    server.add_run(
        RUN_ID, [{"x": i} for i in range(7)], entity=ENTITY, project=PROJECT, config={"lr": 0.5}, exitcode=None
    )  # as if its uploader had died
    res = run_wandb(
        server,
        tmp_path,
        init_timeout=15,
        finish_timeout=15,
        init_kwargs={"id": RUN_ID, "resume": "must"},
        rows=[{"x": 7}, {"x": 8}],
    )
    assert res["init"] == "ok" and res["finish"] == "ok", _fmt(res)
    assert res["starting_step"] == 7 and res["resumed"] is True, _fmt(res)
    assert res["config"]["lr"] == 0.5  # the run's config comes back from the server
    assert _steps_and_x(server.history_rows(RUN_ID)) == [(i, i) for i in range(9)]
    assert server.exitcode(RUN_ID) == 0


def test_resume_must_of_an_unknown_run_fails(server, tmp_path):
    server.add_run("other", [{"x": 1}])
    res = run_wandb(server, tmp_path, init_timeout=15, init_kwargs={"id": RUN_ID, "resume": "must"})
    assert res["init"] == "error", _fmt(res)
    assert res["exc_type"] == "UsageError", _fmt(res)
    assert "does not exist or has not been initialized" in res["exc"], _fmt(res)
    assert server.history_rows(RUN_ID) == []


# --- rewind: resume_from=<id>?_step=N ----------------------------------------

# What wandb 0.31 raises from wandb.init when the server has no rewindRun
# mutation (the uploader classifies it): the fake's default answer (HTTP 200,
# a GraphQL validation error) and the same error sent with HTTP 400.
REWIND_REFUSED = {
    200: 'failed to rewind run: input:3:2: Cannot query field "rewindRun" on type "Mutation".\n',
    400: 'failed to rewind run: returned error 400: {"data":null,"errors":[{"message":'
    '"Cannot query field \\"rewindRun\\" on type \\"Mutation\\".",'
    '"locations":[{"line":3,"column":2}]}]}',
}


@pytest.mark.parametrize("status", [200, 400])
def test_resume_from_is_refused_and_init_raises(tmp_path, status):
    srv = FakeWandb(rewind_refusal_status=status).start()
    try:
        srv.add_run(RUN_ID, [{"x": i} for i in range(10)], entity=ENTITY, project=PROJECT)
        res = run_wandb(srv, tmp_path, init_timeout=15, init_kwargs={"resume_from": f"{RUN_ID}?_step=5"})
        assert res["init"] == "error", _fmt(res)
        assert (res["exc_module"], res["exc_type"]) == ("wandb.errors.errors", "CommError")
        assert res["exc"] == REWIND_REFUSED[status], _fmt(res)
        # Refused before the run was touched: no upsert, no file_stream, history intact.
        ops = srv.graphql_operations()
        assert ops.count("RewindRun") == 1 and "UpsertBucket" not in ops, ops
        assert not any(p.endswith("/file_stream") for _, p in srv.requests())
        assert _steps_and_x(srv.history_rows(RUN_ID)) == [(i, i) for i in range(10)]
    finally:
        srv.stop()


def test_resume_from_rewinds_when_the_server_supports_it(tmp_path):
    srv = FakeWandb(rewind=True).start()
    try:
        srv.add_run(RUN_ID, [{"x": i} for i in range(10)], entity=ENTITY, project=PROJECT)
        res = run_wandb(
            srv,
            tmp_path,
            init_timeout=15,
            finish_timeout=15,
            init_kwargs={"resume_from": f"{RUN_ID}?_step=5"},
            rows=[{"x": 100 + i} for i in range(6, 9)],
        )
        assert res["init"] == "ok" and res["finish"] == "ok", _fmt(res)
        assert res["run_id"] == RUN_ID and res["starting_step"] == 6, _fmt(res)
        # Steps 6..9 of the first attempt are gone; the new ones follow step 5.
        assert _steps_and_x(srv.history_rows(RUN_ID)) == [(i, i) for i in range(6)] + [
            (i, 100 + i) for i in range(6, 9)
        ]
        assert srv.summary(RUN_ID)["x"] == 108
    finally:
        srv.stop()


def test_resume_from_of_a_running_run_is_refused_even_with_rewind(tmp_path):
    srv = FakeWandb(rewind=True).start()
    try:
        # exitcode=None: no final file_stream post, the run is still running.
        srv.add_run(RUN_ID, [{"x": i} for i in range(10)], exitcode=None)
        res = run_wandb(srv, tmp_path / "running", init_timeout=15, init_kwargs={"resume_from": f"{RUN_ID}?_step=5"})
        assert res["init"] == "error" and res["exc_type"] == "CommError", _fmt(res)
        assert res["exc"] == (
            'failed to rewind run: returned error 400: {"data":{"rewindRun":null},"errors":'
            '[{"message":"cannot rewind a run that is not in a terminal state","path":["rewindRun"]}]}'
        ), _fmt(res)
        assert len(srv.history_rows(RUN_ID)) == 10

        srv.crash_run(RUN_ID)  # now it is terminal
        res = run_wandb(
            srv,
            tmp_path / "crashed",
            init_timeout=15,
            finish_timeout=15,
            init_kwargs={"resume_from": f"{RUN_ID}?_step=5"},
            rows=[{"x": 60}],
        )
        assert res["init"] == "ok" and res["starting_step"] == 6, _fmt(res)
        assert _steps_and_x(srv.history_rows(RUN_ID)) == [(i, i) for i in range(6)] + [(6, 60)]
    finally:
        srv.stop()


# --- the server alone (no wandb) ---------------------------------------------


def _raw_post(url: str, path: str, timeout: float = 5.0) -> bytes:
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        body = b'{"query":"query Viewer { viewer { id } }","operationName":"Viewer"}'
        s.sendall(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


@pytest.mark.parametrize("mode,status", [("ok", b" 200 "), ("401", b" 401 "), ("500", b" 500 ")])
def test_status_per_mode(server, mode, status):
    server.mode = mode
    resp = _raw_post(server.url, "/graphql")
    assert resp.split(b"\r\n", 1)[0].find(status) > 0, resp[:200]


def test_hang_blocks_until_stop_and_stop_is_prompt(tmp_path):
    srv = FakeWandb("hang").start()
    result: dict = {}

    def client():
        t = time.monotonic()
        try:
            result["resp"] = _raw_post(srv.url, "/graphql", timeout=10)
        except OSError as e:
            result["err"] = e
        result["t"] = time.monotonic() - t

    th = threading.Thread(target=client, daemon=True)
    th.start()
    time.sleep(1.0)
    assert th.is_alive(), "request was answered in hang mode"
    srv.stop()  # must release the hanging request
    th.join(5)
    assert not th.is_alive()
    assert not result.get("resp"), result  # closed without an answer


def test_stall_after_init_only_hangs_file_stream(server):
    server.mode = "stall_after_init"
    assert b" 200 " in _raw_post(server.url, "/graphql").split(b"\r\n", 1)[0]
    with pytest.raises(socket.timeout):
        _raw_post(server.url, "/files/e/p/r/file_stream", timeout=1.0)


def _graphql_post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url + "/graphql", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


RESUME_STATUS = {"operationName": "RunResumeStatus", "query": "query RunResumeStatus { x }"}


def test_run_resume_status_answers_from_the_runs_record(server):
    rows = [{"x": i} for i in range(12)]
    server.add_run(RUN_ID, rows, project=PROJECT, config={"lr": 0.5})
    status, body = _graphql_post(
        server.url, dict(RESUME_STATUS, variables={"project": PROJECT, "entity": ENTITY, "name": RUN_ID})
    )
    assert status == 200
    bucket = body["data"]["model"]["bucket"]
    assert bucket["historyLineCount"] == 12
    assert bucket["eventsLineCount"] == 0 and bucket["logLineCount"] == 0
    tail = json.loads(bucket["historyTail"])  # a JSON list of JSON strings
    assert [json.loads(line)["_step"] for line in tail] == list(range(2, 12))
    assert json.loads(bucket["eventsTail"]) == []
    assert json.loads(bucket["summaryMetrics"]) == {"x": 11, "_step": 11}
    assert json.loads(bucket["config"])["lr"] == {"value": 0.5}
    assert "t" in json.loads(bucket["wandbConfig"])

    for variables in (
        {"project": PROJECT, "entity": ENTITY, "name": "nope"},
        {"project": "another-project", "entity": ENTITY, "name": RUN_ID},
    ):
        status, body = _graphql_post(server.url, dict(RESUME_STATUS, variables=variables))
        assert status == 200 and body["data"]["model"]["bucket"] is None


def test_line_counts_follow_every_file_stream_file(server):
    def post(files: dict) -> None:
        req = urllib.request.Request(
            f"{server.url}/files/{ENTITY}/{PROJECT}/{RUN_ID}/file_stream",
            data=json.dumps({"files": files}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200

    post(
        {
            "wandb-history.jsonl": {"offset": 0, "content": ['{"_step": 0}', '{"_step": 1}']},
            "wandb-events.jsonl": {"offset": 0, "content": ['{"_runtime": 3}']},
            "output.log": {"offset": 0, "content": ["a", "b", "c"]},
        }
    )
    post(
        {
            "wandb-history.jsonl": {"offset": 2, "content": ['{"_step": 2}']},
            "output.log": {"offset": 2, "content": ["c2"]},
        }
    )  # a resent line replaces it
    assert server.line_counts(RUN_ID) == {"wandb-history.jsonl": 3, "wandb-events.jsonl": 1, "output.log": 3}
    server.add_run("other", [])  # line_counts of a run without files: none
    assert server.line_counts("other") == {"wandb-history.jsonl": 0}


def test_invalid_mode_rejected():
    with pytest.raises(ValueError):
        FakeWandb("nope")
