"""Health metrics for cluster monitoring, with ``prometheus_client``.

Two outputs, either or both:
- ``serve --metrics-port PORT``: an HTTP endpoint (Prometheus text, or
  OpenMetrics when the scraper asks for it), on 127.0.0.1 unless
  ``--metrics-host`` says otherwise. It includes prometheus_client's
  ``process_*`` metrics (RSS, CPU, open fds, start time) of the sidecar.
- ``serve --metrics-textfile PATH``: the same metrics written atomically every
  ``--metrics-interval`` seconds, for node_exporter's textfile collector. There
  the process metrics are named ``kforge_sidecar_process_*`` (node_exporter has
  its own ``process_*``), and every series carries a ``sidecar`` label (the
  sidecar's address), so the files of several sidecars on one node do not
  clash. The file is removed when the sidecar stops cleanly.

Everything comes from the server's ``status()`` view, the one ``status --json``
prints; the server's loop takes a snapshot every second (the HTTP thread only
ever reads a finished snapshot). Counters count since this sidecar started,
as Prometheus counters do: frames that a restarted sidecar recovers from the
spool, and frames a restarted uploader hands to wandb again, are not counted
twice. Names follow node agents (the OpenTelemetry Collector's
``otelcol_exporter_queue_size``/``send_failed``, Fluent Bit's
``output_retries_total``/``dropped_records_total``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .config import ServeConfig
from .spool import UploadState

log = logging.getLogger("kforge_sidecar.metrics")

NS = "kforge_sidecar"
SNAPSHOT_EVERY = 1.0  # seconds
STATES = tuple(s.value for s in UploadState)
REJECT_REASONS = ("malformed", "version", "unknown_type", "bad_field", "bad_value", "too_many", "oversize")
FAILURE_REASONS = ("retry", "wedged", "crash")
COUNTED = ("received", "acknowledged", "uploaded", "client_dropped")  # per run, summed into counters


class MetricsError(RuntimeError):
    """The metrics endpoint or textfile cannot be set up; one line for the user."""


@dataclass
class RunCounts:
    base: dict[str, int]  # the values when this sidecar first saw the run (recovered from the spool)
    high: dict[str, int] = field(default_factory=dict)  # the highest values seen since

    def since_start(self, key: str) -> int:
        return self.high.get(key, 0) - self.base.get(key, 0)


class Counters:
    """Per-run values of the status view turned into counters since this sidecar started."""

    def __init__(self) -> None:
        self.runs: dict[str, RunCounts] = {}
        self.retired = dict.fromkeys(COUNTED, 0)  # runs that left the spool
        self._first = True

    def update(self, rows: list[dict[str, Any]]) -> dict[str, int]:
        seen = set()
        for row in rows:
            rid = row["run_id"]
            seen.add(rid)
            rc = self.runs.get(rid)
            if rc is None:
                # runs there at the first look were recovered from the spool: not received by us
                base = {k: int(row.get(k) or 0) for k in COUNTED} if self._first else {}
                rc = self.runs[rid] = RunCounts(base=base)
            for k in COUNTED:
                rc.high[k] = max(rc.high.get(k, 0), int(row.get(k) or 0), rc.base.get(k, 0))
        self._first = False
        for rid in [r for r in self.runs if r not in seen]:
            rc = self.runs.pop(rid)
            for k in COUNTED:
                self.retired[k] += rc.since_start(k)
        return {k: self.retired[k] + sum(rc.since_start(k) for rc in self.runs.values()) for k in COUNTED}


class SidecarCollector(Collector):
    def __init__(self, exporter: "Exporter"):
        self.exporter = exporter

    def collect(self) -> Iterator[Metric]:
        snap = self.exporter.snapshot
        if snap is None:
            return
        sc, runs, totals = snap["sidecar"], snap["runs"], snap["totals"]

        def gauge(name: str, doc: str, value: float | None, unit: str = "") -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"{NS}_{name}", doc, unit=unit)
            if value is not None:
                g.add_metric([], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{NS}_{name}", doc, value=value)

        info = GaugeMetricFamily(
            f"{NS}_info",
            "The sidecar: version, address and spool (always 1).",
            labels=["version", "address", "spool_dir"],
        )
        info.add_metric([sc.get("version") or "unknown", sc["address"], sc["spool_dir"]], 1)
        yield info
        yield gauge("uptime_seconds", "Seconds since this sidecar started.", sc["uptime"])
        yield counter("frames_received_total", "Metrics frames written to the spool.", totals["received"])
        yield counter(
            "frames_acknowledged_total",
            "Metrics frames acknowledged to clients (durable in the spool).",
            totals["acknowledged"],
        )
        yield counter("frames_uploaded_total", "Metrics frames handed to wandb.", totals["uploaded"])
        yield gauge(
            "frames_pending",
            "Frames in the spool not yet handed to wandb (the upload queue).",
            sum(r["pending"] for r in runs),
        )
        ages = [r["oldest_pending_age"] for r in runs if r.get("oldest_pending_age") is not None]
        yield gauge(
            "oldest_pending_frame_age_seconds",
            "Age of the oldest frame not yet handed to wandb (0 when none).",
            max(ages, default=0.0),
        )
        rejected = CounterMetricFamily(
            f"{NS}_frames_rejected", "Frames rejected as invalid, by reason.", labels=["reason"]
        )
        by_reason = dict.fromkeys(REJECT_REASONS, 0) | dict(sc.get("rejected") or {})
        for reason, n in sorted(by_reason.items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield counter(
            "frames_duplicate_total",
            "Frames a client sent again that the spool already had (dropped).",
            sc.get("duplicates") or 0,
        )
        yield counter(
            "client_dropped_frames_total",
            "Frames clients dropped before they reached the sidecar (client buffer full).",
            totals["client_dropped"],
        )
        states = GaugeMetricFamily(f"{NS}_runs", "Runs in the spool, by upload state.", labels=["state"])
        counts = dict.fromkeys(STATES, 0)
        for r in runs:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        for state, n in counts.items():
            states.add_metric([state], n)
        yield states
        yield gauge("uploader_processes", "Uploader processes running.", sc.get("uploader_processes") or 0)
        failures = dict.fromkeys(FAILURE_REASONS, 0) | dict(sc.get("uploader_failures") or {})
        yield counter(
            "uploader_restarts_total", "Uploader processes restarted after a failure.", sum(failures.values())
        )
        failed = CounterMetricFamily(
            f"{NS}_uploader_failures",
            "Uploader exits other than a clean one, by reason: retry (wandb failed transiently; retried after a backoff), "
            "wedged (killed: no heartbeat), crash (any other exit).",
            labels=["reason"],
        )
        for reason, n in sorted(failures.items()):
            failed.add_metric([reason], n)
        yield failed
        spool = sc.get("spool") or {}
        yield gauge("spool_bytes", "Bytes on disk in the spool.", spool.get("bytes"))
        yield gauge(
            "spool_free_bytes", "Free bytes on the spool's filesystem (for this user).", spool.get("free_bytes")
        )
        yield gauge(
            "spool_writable",
            "1 while the spool takes writes, 0 while a write or fsync fails (nothing is acknowledged).",
            0 if sc.get("disk_error") else 1,
        )
        yield gauge(
            "spool_on_network_fs",
            "1 if the spool is on a network filesystem (put it on node-local disk).",
            1 if spool.get("network_fs") else 0,
        )
        ret = sc.get("retention") or {}
        if ret.get("max_bytes") is not None:
            yield gauge("spool_max_bytes", "The spool's size cap (--spool-max-bytes).", ret["max_bytes"])
        yield gauge(
            "spool_over_cap",
            "1 while the spool is over its size cap and no run in it may be removed.",
            1 if ret.get("over_cap") else 0,
        )
        yield counter(
            "spool_removed_runs_total",
            "Finished and uploaded runs removed from the spool (retention or size cap).",
            ret.get("removed_runs") or 0,
        )
        yield counter(
            "spool_removed_bytes_total", "Bytes freed by removing runs from the spool.", ret.get("removed_bytes") or 0
        )


class Labelled(Collector):
    """Another collector's metrics with extra labels on every series."""

    def __init__(self, inner: Collector, labels: dict[str, str]):
        self.inner = inner
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        for fam in self.inner.collect():
            out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                out.add_sample(s.name, {**s.labels, **self.labels}, s.value, s.timestamp, s.exemplar)
            yield out


class Exporter:
    """Owned by the server: ``tick`` from its loop, ``stop`` when it drains."""

    def __init__(self, server: Any, cfg: ServeConfig):
        self.server = server
        self.cfg = cfg
        self.snapshot: dict[str, Any] | None = None
        self.counters = Counters()
        self.collector = SidecarCollector(self)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        self.file_registry = CollectorRegistry()
        labels = {"sidecar": cfg.address}
        self.file_registry.register(Labelled(self.collector, labels))
        self.file_registry.register(Labelled(ProcessCollector(namespace=NS, registry=None), labels))
        self.httpd: Any = None
        self._thread: threading.Thread | None = None
        self.url: str | None = None
        self._last_snapshot = self._last_write = -1e18

    def start(self) -> "Exporter":
        self.refresh()
        cfg = self.cfg
        if cfg.metrics.textfile is not None:
            try:
                self.write()
            except OSError as exc:
                raise MetricsError(
                    f"cannot write --metrics-textfile {cfg.metrics.textfile}: {exc.strerror or exc} "
                    "(its directory must exist and be writable; node_exporter reads *.prom files)"
                ) from None
            self._last_write = time.monotonic()
            log.info("metrics: writing %s every %gs", cfg.metrics.textfile, cfg.metrics.interval)
        if cfg.metrics.port is not None:
            try:
                self.httpd, self._thread = start_http_server(
                    cfg.metrics.port, addr=cfg.metrics.host, registry=self.registry
                )
            except OSError as exc:
                raise MetricsError(
                    f"cannot serve metrics on {cfg.metrics.host}:{cfg.metrics.port}: {exc.strerror or exc}; "
                    "choose another --metrics-port (0 picks a free one)"
                ) from None
            host = cfg.metrics.host if ":" not in cfg.metrics.host else f"[{cfg.metrics.host}]"
            self.url = f"http://{host}:{self.httpd.server_port}/metrics"
            log.info("metrics: serving %s", self.url)
        return self

    def where(self) -> dict[str, str | None]:
        return {"url": self.url, "textfile": str(self.cfg.metrics.textfile) if self.cfg.metrics.textfile else None}

    def refresh(self) -> None:
        body = self.server.status()
        body["totals"] = self.counters.update(body["runs"])
        self.snapshot = body  # replaced whole: the HTTP thread reads one consistent view

    def tick(self, now: float) -> None:
        if now - self._last_snapshot >= SNAPSHOT_EVERY:
            self._last_snapshot = now
            self.refresh()
        if self.cfg.metrics.textfile is not None and now - self._last_write >= self.cfg.metrics.interval:
            self._last_write = now
            try:
                self.write()
            except OSError as exc:
                log.error("metrics: cannot write %s: %s; will try again", self.cfg.metrics.textfile, exc)

    def write(self) -> None:
        # write_to_textfile writes PATH.<pid>.<thread> beside it and renames it over PATH
        write_to_textfile(str(self.cfg.metrics.textfile), self.file_registry)

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        if self.cfg.metrics.textfile is not None:
            try:
                os.unlink(self.cfg.metrics.textfile)  # a stopped sidecar has no health to report
            except OSError:
                pass


def textfile_path_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a textfile for node_exporter, if it cannot (checked at parse time)."""
    if path.is_dir():
        return f"{path} is a directory; name the file (node_exporter reads *.prom)"
    if not path.parent.is_dir():
        return f"directory {path.parent} does not exist"
    if not path.name.endswith(".prom"):
        return f"{path.name} does not end in .prom; node_exporter's textfile collector reads only *.prom files"
    return None
