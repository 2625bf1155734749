"""Before and after in one run: `bench_reply` against two versions of the code, alternating.

    python -m benchmarks.compare_reply --base REV [--sessions 50,100] [--repeat 2] [--no-compression]

The base revision is checked out into a temporary git worktree; the working tree is the
"after". Each repeat runs the base, then the working tree, with the same arguments, so
drifting load on a shared machine hits both alike. Writes
`benchmarks/results/compare_reply.md` (and `.json`): overhead and latency percentiles, replies
and errors per version, repeat and N, and the median over the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO_ROOT, RESULTS_DIR, code_version, machine_info, write_report


def _run(cwd: Path, args: list[str], out: Path) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "benchmarks.bench_reply", *args, "--out", str(out), "--no-plot"]
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return json.loads(out.with_suffix(".json").read_text())["rows"]


def _pct(row: dict[str, Any], key: str, p: str) -> float | None:
    v = (row.get(key) or {}).get(p)
    return None if v is None else float(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the git revision to compare against (the 'before')")
    ap.add_argument("--sessions", default="50,100")
    ap.add_argument("--modes", default="batched")
    ap.add_argument("--frame-ms", default="20")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-compression", action="store_true", help="passed to bench_reply")
    ap.add_argument("--out", default=str(RESULTS_DIR / "compare_reply.md"))
    a = ap.parse_args(argv)
    args = ["--modes", a.modes, "--sessions", a.sessions, "--frame-ms", a.frame_ms]
    if a.no_compression:
        args.append("--no-compression")
    base_rev = subprocess.run(["git", "rev-parse", "--short", a.base], cwd=REPO_ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
    after = code_version()
    results: dict[str, list[list[dict[str, Any]]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_dir), a.base], cwd=REPO_ROOT, check=True,
                       capture_output=True)
        try:
            for rep in range(a.repeat):
                for label, cwd in (("before", base_dir), ("after", REPO_ROOT)):
                    print(f"repeat {rep + 1}/{a.repeat}: {label}", flush=True)
                    results[label].append(_run(cwd, args, Path(tmp) / f"{label}_{rep}.md"))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_dir)], cwd=REPO_ROOT, capture_output=True)
    lines = [
        "# bench_reply before and after, alternating in one run",
        "",
        f"- machine: {machine_info()['cpu_model']}, {machine_info()['usable_cpus']} usable CPUs",
        f"- before: `{base_rev}`; after: `{after}`",
        f"- each repeat: `python -m benchmarks.bench_reply {' '.join(args)}` on the before, then the after",
        "",
        "| version | repeat | mode | N | replies | errors | overhead p50 / p95 ms | e2r p95 ms | server CPU % |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    medians: dict[tuple[str, str, int], list[float]] = {}
    for label in ("before", "after"):
        for rep, rows in enumerate(results[label]):
            for r in rows:
                p50, p95 = _pct(r, "overhead_pcts_ms", "p50"), _pct(r, "overhead_pcts_ms", "p95")
                e2r = _pct(r, "e2r_pcts_ms", "p95")
                lines.append(
                    f"| {label} | {rep + 1} | {r['label']} | {r['n']} | {r['replies_ok']}/{r['replies_expected']} | "
                    f"{r['errors']} | {p50 if p50 is None else round(p50)} / {p95 if p95 is None else round(p95)} | "
                    f"{e2r if e2r is None else round(e2r)} | {r['server_cpu_pct'] if r['server_cpu_pct'] is None else round(r['server_cpu_pct'])} |"
                )
                if p95 is not None:
                    medians.setdefault((label, r["label"], r["n"]), []).append(p95)
    lines += ["", "Median over the repeats of the overhead p95 (ms):", ""]
    for (label, mode, n), vals in sorted(medians.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0] != "before")):
        lines.append(f"- {mode}, N={n}, {label}: {statistics.median(vals):.0f}")
    md = "\n".join(lines)
    print(md)
    write_report(Path(a.out), md, {"base": base_rev, "after": after, "args": args, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
