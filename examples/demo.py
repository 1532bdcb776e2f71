"""The demo: a sidecar and the tiny CPU trainer, wandb offline, no account needed.

    make demo        (or: python examples/demo.py)

Starts `kforge-sidecar serve` on a private socket, trains for 200 steps,
closes the run, stops the sidecar (which drains), then reads the run back
from wandb's own record and says where everything is.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    out = Path(os.environ.get("DEMO_OUT", ROOT / "demo-out")).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    sock_dir = Path(tempfile.mkdtemp(prefix="kfs-demo-"))  # 0700; short enough for an ipc path
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env.update(
        KFORGE_SIDECAR_ADDR=f"ipc://{sock_dir}/sidecar.sock",
        KFORGE_SPOOL_DIR=str(out / "spool"),
        WANDB_DIR=str(out),
        WANDB_SILENT="true",
    )
    py = sys.executable
    print(f"== sidecar: {env['KFORGE_SIDECAR_ADDR']}, spool {out / 'spool'}, wandb {env['WANDB_MODE']}")
    log = open(out / "sidecar.log", "wb")
    sidecar = subprocess.Popen([py, "-m", "sidecar", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        print("== training (examples/train_tiny.py, CPU)")
        r = subprocess.run(
            [py, str(ROOT / "examples" / "train_tiny.py"), "--steps", "200", "--ckpt-dir", str(out / "ckpt")],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        sys.stderr.write(r.stderr)
        if r.returncode != 0:
            print(r.stdout)
            return r.returncode
        result = json.loads(r.stdout.strip().splitlines()[-1])
        run_id = result["run_id"]
        print(f"== wandb run ID: {run_id} (also in {out / 'ckpt' / 'last.pt'} as extra['wandb_run_id'])")
        print(f"== client stats: {result['stats']}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            s = subprocess.run([py, "-m", "sidecar", "status", "--json"], env=env, capture_output=True, text=True)
            runs = json.loads(s.stdout).get("runs", []) if s.returncode == 0 else []
            if any(x["run_id"] == run_id and x["state"] in ("finished", "failed") for x in runs):
                break
            time.sleep(0.3)
        subprocess.run([py, "-m", "sidecar", "status", "--all"], env=env)
    finally:
        sidecar.send_signal(signal.SIGTERM)  # drain and stop
        sidecar.wait(90)
        shutil.rmtree(sock_dir, ignore_errors=True)
    files = sorted(out.glob(f"wandb/*-{run_id}/run-{run_id}.wandb"))
    if not files:
        print("no wandb record found; see", out / "sidecar.log")
        return 1
    summary = json.loads(
        subprocess.run(
            [str(Path(py).parent / "wandb"), "leet", "inspect", "--summary", "--json", str(files[0])],
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
    )
    s = summary["summary"]
    print(f"== wandb record: {files[0]}")
    print(
        f"   state={summary['state']} exit_code={summary['exit_code']} steps={summary['step']} "
        f"train/loss={s.get('train/loss'):.4f} eval/loss={s.get('eval/loss'):.4f} eval/accuracy={s.get('eval/accuracy'):.3f}"
    )
    print(f"   read it back:  {Path(py).parent / 'wandb'} leet inspect --json {files[0]}")
    print(f"   upload later:  wandb sync {files[0].parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
