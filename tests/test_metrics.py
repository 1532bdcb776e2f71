"""Health metrics: a real sidecar's endpoint scraped over HTTP and its node_exporter
textfile, both parsed with prometheus_client's own parsers and checked against
`status --json` while runs are live, finished and failed."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import zmq
from conftest import finish_trainer, start_trainer, wait_for
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from devtools.fakewandb import FakeWandb

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def scrape(url: str, accept: str | None = None) -> tuple[str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.headers["Content-Type"], resp.read().decode()


def samples(text: str, parser=parse_prometheus) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, for every sample."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in parser(text) for s in fam.samples}


def value(m: dict, name: str, **labels: str) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def expected_from_status(st: dict) -> dict[tuple[str, tuple], float]:
    """What the endpoint must say, computed from `status --json` alone (this sidecar
    started on an empty spool, so its counters equal the per-run sums)."""
    sc, runs = st["sidecar"], st["runs"]
    exp = {
        ("kforge_sidecar_frames_received_total", ()): sum(r["received"] for r in runs),
        ("kforge_sidecar_frames_acknowledged_total", ()): sum(r["acknowledged"] for r in runs),
        ("kforge_sidecar_frames_uploaded_total", ()): sum(r["uploaded"] for r in runs),
        ("kforge_sidecar_frames_pending", ()): sum(r["pending"] for r in runs),
        ("kforge_sidecar_client_dropped_frames_total", ()): sum(r["client_dropped"] for r in runs),
        ("kforge_sidecar_uploader_restarts_total", ()): sum(r["uploader_restarts"] for r in runs),
        ("kforge_sidecar_spool_bytes", ()): sc["spool"]["bytes"],
        ("kforge_sidecar_spool_writable", ()): 0 if sc["disk_error"] else 1,
    }
    for state in ("waiting", "initializing", "live", "retrying", "failed", "finished"):
        exp[("kforge_sidecar_runs", (("state", state),))] = sum(r["state"] == state for r in runs)
    for reason in ("malformed", "bad_field", "version"):
        exp[("kforge_sidecar_frames_rejected_total", (("reason", reason),))] = sc["rejected"].get(reason, 0)
    return exp


def send_garbage(address: str, frames: list[bytes]) -> None:
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 2000)
        s.connect(address)
        for f in frames:
            s.send(f)
        s.close()
    finally:
        ctx.term()


@pytest.fixture
def denied():
    srv = FakeWandb("401").start()
    yield srv
    srv.stop()


def test_metrics_endpoint_and_textfile_match_status_during_runs(env, sidecar, denied):
    env.extra["WANDB_API_KEY"] = "k" * 40  # offline runs ignore it; the online one needs one
    textfile = env.base / "kforge.prom"
    sc = sidecar("--metrics-port", "0", "--metrics-textfile", str(textfile), "--metrics-interval", "0.5")
    st = sc.status()
    url = st["sidecar"]["metrics"]["url"]
    assert url.startswith("http://127.0.0.1:")  # loopback unless told otherwise

    # one run finished, one refused by its backend (frames pending), one still open and live
    done, refused, live = [finish_trainer(t) for t in [
        start_trainer(env, "--steps", "30", "--name", "done"),
        start_trainer(env, "--steps", "20", "--name", "refused", "--wandb-init", json.dumps({"mode": "online", "base_url": denied.url})),
        start_trainer(env, "--steps", "25", "--no-close", "--name", "live"),  # its run stays open
    ]]  # fmt: skip
    send_garbage(env.address, [b"\xc1not msgpack", b"\x93\x01\x02\x03"])  # not msgpack; not a map
    sc.wait_run(done["run_id"], "finished")
    sc.wait_run(refused["run_id"], "failed")
    wait_for(
        lambda: (r := sc.run(live["run_id"])) and r["state"] == "live" and r["pending"] == 0,
        60,
        0.2,
        "the open run to be live",
    )

    # during the run: the scrape agrees with `status --json` (its snapshot is at most ~1 s old)
    def agrees():
        st = sc.status()
        m = samples(scrape(url)[1])
        exp = expected_from_status(st)
        return (st, m) if all(m.get(k) == v for k, v in exp.items()) else None

    st, m = wait_for(agrees, 30, 0.3, "the endpoint to agree with status --json")
    assert value(m, "kforge_sidecar_runs", state="failed") == 1
    assert value(m, "kforge_sidecar_frames_rejected_total", reason="malformed") == 2
    assert value(m, "kforge_sidecar_frames_pending") >= 20  # the refused run's frames wait in the spool
    age = max(r["oldest_pending_age"] for r in st["runs"] if r["pending"])
    assert 0 < value(m, "kforge_sidecar_oldest_pending_frame_age_seconds") <= age + 2
    assert value(m, "kforge_sidecar_spool_free_bytes") == pytest.approx(st["sidecar"]["spool"]["free_bytes"], rel=0.05)
    assert value(m, "kforge_sidecar_uptime_seconds") > 0
    assert value(m, "process_resident_memory_bytes") > 10e6  # prometheus_client's process collector
    assert (
        value(m, "kforge_sidecar_info", version=st["sidecar"]["version"], address=env.address, spool_dir=str(env.spool))
        == 1
    )

    # OpenMetrics, when the scraper asks for it, parsed by the OpenMetrics parser
    ctype, text = scrape(url, OPENMETRICS)
    assert ctype.startswith("application/openmetrics-text") and text.rstrip().endswith("# EOF")
    om = samples(text, parse_openmetrics)
    assert value(om, "kforge_sidecar_frames_received_total") >= value(m, "kforge_sidecar_frames_received_total")

    assert value(m, "kforge_sidecar_frames_received_total") == 30 + 20 + 25
    assert value(m, "kforge_sidecar_frames_uploaded_total") == 30 + 25
    assert [value(m, "kforge_sidecar_runs", state=s) for s in ("live", "failed", "finished")] == [1, 1, 1]

    # the textfile: the same metrics, every series labelled with the sidecar, process metrics prefixed
    def textfile_agrees():
        f = samples(textfile.read_text())
        got = {(n, tuple(x for x in lab if x[0] != "sidecar")): v for (n, lab), v in f.items()}
        ok = all(
            got.get(k) == v
            for k, v in expected_from_status(sc.status()).items()
            if k[0] != "kforge_sidecar_spool_bytes"
        )
        return f if ok else None

    f = wait_for(textfile_agrees, 10, 0.3, "the textfile to agree with status --json")
    assert all(dict(lab)["sidecar"] == env.address for (_n, lab) in f)
    assert any(n == "kforge_sidecar_process_resident_memory_bytes" for n, _ in f)
    assert not any(n.startswith("process_") for n, _ in f)  # node_exporter has its own
    assert not list(env.base.glob("kforge.prom.*"))  # written beside it and renamed over it

    assert sc.stop() == 0
    assert not textfile.exists()  # a stopped sidecar reports nothing rather than stale health
    with pytest.raises(urllib.error.URLError):
        scrape(url)


def test_metrics_port_in_use_is_one_line_and_exit_1(env, sidecar):
    first = sidecar("--metrics-port", "0")
    port = first.status()["sidecar"]["metrics"]["url"].rsplit(":", 1)[1].split("/")[0]
    r = first.cli("serve", "--address", f"ipc://{env.base}/other.sock", "--spool-dir", str(env.base / "spool2"),
                  "--metrics-port", port, timeout=30)  # fmt: skip
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in errors[0]
    assert "choose another --metrics-port" in errors[0] and "Traceback" not in r.stderr
