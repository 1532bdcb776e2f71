"""One table from every benchmark's JSON in bench-out/ (``make bench`` prints it last).

Each benchmark writes ``bench-out/<name>.json`` with a ``rows`` list; a row is one
figure and the reference it is judged against, both measured in the same run::

    {"what": ..., "value": ..., "unit": ..., "reference_what": ..., "reference": ...,
     "ratio": ..., "goal": ">= 0.95" | "<= 1.5", "met": true, "detail": {...}}

Prints the table as Markdown (what the README's figures are copied from) and writes
bench-out/report.md. Exits 1 when a row is missing its figures; a goal not met is
reported, not an error: benchmarks measure, tests assert.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("what", "value", "unit", "reference_what", "reference", "ratio", "goal", "met")


def _num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}".replace(",", " ")
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def load(out: Path) -> tuple[list[tuple[str, dict]], list[str], list[str]]:
    """(bench name, row) pairs, the machines they ran on, and problems found."""
    rows: list[tuple[str, dict]] = []
    machines: list[str] = []
    problems: list[str] = []
    for path in sorted(out.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            problems.append(f"{path.name}: not JSON ({exc})")
            continue
        if not isinstance(data, dict) or "rows" not in data:
            continue  # a benchmark with its own format (log_latency*.json)
        name = str(data.get("bench", path.stem))
        if data.get("machine") and data["machine"] not in machines:
            machines.append(str(data["machine"]))
        for row in data["rows"]:
            missing = [k for k in REQUIRED if k not in row]
            if missing:
                problems.append(f"{path.name}: row {row.get('what', '?')!r} lacks {', '.join(missing)}")
                continue
            rows.append((name, row))
    return rows, machines, problems


def table(rows: list[tuple[str, dict]]) -> str:
    lines = [
        "| bench | what | value | reference | ratio | goal | met |",
        "|---|---|---:|---|---:|---|:---:|",
    ]
    for name, r in rows:
        unit = f" {r['unit']}" if r["unit"] else ""
        lines.append(
            f"| {name} | {r['what']} | {_num(r['value'])}{unit} | {r['reference_what']}: {_num(r['reference'])}{unit} "
            f"| {r['ratio']:.2f} | {r['goal']} | {'yes' if r['met'] else '**no**'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench-out", help="where the benchmarks wrote their JSON")
    args = p.parse_args(argv)
    rows, machines, problems = load(args.out)
    text = table(rows) + "\n"
    if machines:
        text += "\nMachine: " + "; ".join(machines) + "\n"
    (args.out / "report.md").write_text(text)
    print(text)
    for problem in problems:
        print(f"report: {problem}", file=sys.stderr)
    return 1 if problems or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
