"""Sessions one front-end process holds: the local VAD engine vs BATCHRTC_ENGINE=ray (issue 15).

For each engine and each N, a fresh front-end server process (`uvicorn server.echo_app:stream
--ws-per-message-deflate false`, `ReplyOnPause(echo)`) takes N real-time WebSocket
`ReplyOnPause` sessions from `benchmarks.bench_reply`'s load generator (its workloads, client
processes, scoring and CPU/RSS sampler: 20 ms mu-law frames of the four speech fixtures, no
permessage-deflate, starts staggered over 0.6 s, one unmeasured warm-up session):

* ``local``: `BATCHRTC_ENGINE=local`, the VAD batcher in the front-end process.
* ``ray``: `BATCHRTC_ENGINE=ray`, the VAD on one Ray Serve replica of a local 2-CPU cluster
  started by this benchmark (before the first ray row, after the local rows: the local rows
  run without Ray's daemons), deployed once and warm; the front end joins it by RAY_ADDRESS.
  The replica's CPU and RSS are measured apart (the front end's own are its process tree's).

Per row: replies delivered / expected, end of speech -> first reply byte p50/p95, front-end CPU
(% of one core, steady window) and peak RSS, the replica's, the load generator's, the rest of
the machine, and the VAD batches the row ran (read from each front end's `/metrics`: its own
batcher, or the replicas' `batchrtc_replica_batcher_*`). A mode holds N when every reply
arrived, with no errors, and the e2r p95 is at most `--p95-ms` (default 1,200 ms: issue 16's
bound); the largest N held is printed per engine. On one machine the replica, Ray's daemons,
the front end and the load generator share the same cores: the front end's CPU is what moving
the VAD out of it saves, the latency is what this box pays for the whole.

Usage (needs the `ray` extra)::

    python -m benchmarks.bench_ray_sessions                 # N = 10,25,50,75; ~6 min on 2 cores
    python -m benchmarks.bench_ray_sessions --sessions 10 --engines ray --out /tmp/x.md

Writes ``benchmarks/results/bench_ray_sessions.md`` and ``.json`` (with the command and commit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks import bench_reply as br
from benchmarks.harness import (
    REPO_ROOT, RESULTS_DIR, client_loop, code_version, command_line, machine_info, write_report,
)
from benchmarks.server_process import UvicornProcess

ENGINES = ("local", "ray")
DEFAULT_SESSIONS = "10,25,50,75"
P95_MS = 1200.0


class FrontEnd(UvicornProcess):
    """One front-end server process; what `bench_reply.run_step` needs of a server."""

    def __init__(self, engine: str, *, concurrency: int, address: str | None = None) -> None:
        env = {"BATCHRTC_ENGINE": engine, "BATCHRTC_CONCURRENCY": str(concurrency), "BATCHRTC_VAD_MAX_BATCH": "512"}
        if engine == "ray":
            assert address is not None
            env["RAY_ADDRESS"] = address
        super().__init__(["server.echo_app:stream", "--ws-per-message-deflate", "false", "--log-level", "warning"],
                         env, name=f"bench_ray_sessions_{engine}", start_timeout_s=120)
        self.mode = engine

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/websocket/offer"

    @property
    def command(self) -> str:
        return self.command_line(("BATCHRTC_ENGINE", "RAY_ADDRESS", "BATCHRTC_CONCURRENCY", "BATCHRTC_VAD_MAX_BATCH"))

    def vad_snapshot(self) -> None:
        return None  # the VAD batches are read from /metrics instead (`vad_counts`)

    def vad_counts(self) -> dict[str, float]:
        """Batches and items of the VAD batcher this front end uses, from its /metrics: its own
        (`local`) or the sum over the engine replicas' (`ray`)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {"batches": 0.0, "items": 0.0, "calls": 0.0}
        names = ({"batchrtc_replica_batcher_batches_total": "batches",
                  "batchrtc_replica_batcher_items_completed_total": "items", "batchrtc_replica_calls_total": "calls"}
                 if self.mode == "ray" else
                 {"batchrtc_batcher_batches_total": "batches", "batchrtc_batcher_items_completed_total": "items"})
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                key = names.get(s.name)
                if key and (self.mode == "ray" or s.labels.get("batcher") == "silero_vad"):
                    out[key] += s.value
        return out


def holds(r: br.StepResult, p95_ms: float) -> bool:
    p95 = r.pct("e2r_ms", 95)
    return r.errors == 0 and r.replies_ok == r.replies_expected > 0 and p95 is not None and p95 <= p95_ms


class RayCluster:
    """A local Ray cluster in this process (2 CPUs, loopback, no dashboard) with the VAD
    deployment on it, as the tests start it (tests/ray_cluster.py); stopped by `close`."""

    def __init__(self) -> None:
        import ray

        from server.config import load_settings
        from server.engine.ray_app import connect

        # The replicas import this checkout.
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        self.address = ctx.address_info["gcs_address"]
        self.handle = connect(load_settings())
        self.stats = self.handle.options(method_name="stats")

    def replica(self) -> dict[str, Any]:
        return self.stats.remote().result(timeout_s=30)

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def run(a: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    print("building workloads ...", flush=True)
    workloads = br.build_workloads(a.fixtures, frame_ms=20, tail_s=a.tail_s)
    for w in workloads:
        print(f"  {w.name}: {w.duration_s:.2f} s, pauses at frames {w.pause_frames}", flush=True)
    opts = br.StepOptions(stagger_s=a.stagger_s, tail_s=a.listen_s, client_procs=a.client_procs, compression=None)
    concurrency = max(a.sessions) + 16
    rows: list[dict[str, Any]] = []
    commands: dict[str, str] = {}
    replica_info: dict[str, Any] = {}
    cluster: RayCluster | None = None
    try:
        for engine in a.engines:
            if engine == "ray":
                print("starting a local Ray cluster and the VAD deployment ...", flush=True)
                cluster = RayCluster()
                st = cluster.replica()
                replica_info = {"pid": st["pid"], "replica": st["replica"], "max_batch_size": st["max_batch_size"]}
            for n in a.sessions:
                srv = FrontEnd(engine, concurrency=concurrency, address=cluster.address if cluster else None)
                pids: tuple[int, ...] = ()
                before = after = None
                try:
                    with srv:
                        commands[engine] = srv.command
                        if cluster is not None:
                            pids = (cluster.replica()["pid"],)
                        before = srv.vad_counts()
                        r = br.run_step(srv, n, workloads, opts, engine_pids=pids)
                        after = srv.vad_counts()
                except Exception as e:  # a row that could not run is reported, not hidden
                    r = br.StepResult.failed(engine, n, 20, srv.command, None, workloads, e)
                    print(f"  step failed: {e}\n{srv.log_tail(10)}", file=sys.stderr, flush=True)
                finally:
                    srv.stop()
                    srv.cleanup_log()
                vad = {k: after[k] - before[k] for k in before} if before and after else None
                rows.append({"result": r, "vad": vad, "replica_pids": list(pids)})
                print(row_line(rows[-1], a.p95_ms), flush=True)
    finally:
        if cluster is not None:
            cluster.close()
    expected = {w.name: len(w.pause_frames) for w in workloads}
    return rows, {"commands": commands, "replica": replica_info, "expected_per_fixture": expected}


HEADER = (
    "| engine | N | replies ok/expected | errors | e2r p50 (ms) | e2r p95 (ms) | front-end CPU % | front-end RSS MB "
    "| replica CPU % | replica RSS MB | load generator CPU % | rest CPU % | VAD batches (mean size) | holds |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def row_line(row: dict[str, Any], p95_ms: float) -> str:
    r: br.StepResult = row["result"]
    f = br._f
    vad = row["vad"]
    batches = "-"
    if vad and vad["batches"]:
        batches = f"{vad['batches']:.0f} ({vad['items'] / vad['batches']:.1f})"
        if vad.get("calls"):
            batches += f", {vad['calls']:.0f} calls"
    return (f"| {r.mode} | {r.n} | {r.replies_ok}/{r.replies_expected} | {r.errors} | {f(r.pct('e2r_ms', 50))} "
            f"| {f(r.pct('e2r_ms', 95))} | {f(r.server_cpu_pct)} | {f(r.server_rss_mb)} | {f(r.engine_cpu_pct)} "
            f"| {f(r.engine_rss_mb)} | {f(r.client_cpu_pct)} | {f(r.other_cpu_pct)} | {batches} "
            f"| {'yes' if holds(r, p95_ms) else 'no'} |")


def verdicts(rows: list[dict[str, Any]], p95_ms: float) -> list[str]:
    lines = []
    for engine in dict.fromkeys(x["result"].mode for x in rows):
        mine = sorted((x["result"] for x in rows if x["result"].mode == engine), key=lambda r: r.n)
        held = [r.n for r in mine if holds(r, p95_ms)]
        clean = None
        for r in mine:
            if not holds(r, p95_ms):
                break
            clean = r.n
        lines.append(f"- {engine}: largest N held (every reply, 0 errors, e2r p95 <= {p95_ms:,.0f} ms): "
                     f"{max(held) if held else 'none'} (every N tried up to {clean if clean is not None else '-'} held; "
                     f"tried {', '.join(str(r.n) for r in mine)})")
    return lines


def render(rows: list[dict[str, Any]], meta: dict[str, Any], p95_ms: float) -> str:
    m = meta["machine"]
    lines = [
        "# bench_ray_sessions: sessions one front-end process holds, local VAD engine vs BATCHRTC_ENGINE=ray",
        "",
        f"- date: {meta['date']}",
        f"- machine: {m['cpu_model']}, {m['usable_cpus']} usable cores ({m['logical_cpus']} logical), "
        f"{m.get('memory_gib', '?')} GiB; Python {m['python']}, torch {m.get('torch')}, ray {m.get('ray')}, "
        f"uvicorn {m.get('uvicorn')}, websockets {m.get('websockets')}; no GPU; load average at start "
        f"{m.get('loadavg_at_start')} (the machine is shared)",
        f"- command: `{meta['command']}`; code: {meta['code']}",
        "- front ends (a fresh process per row, one unmeasured warm-up session each):",
        *[f"  - {k}: `{v}`" for k, v in meta["commands"].items()],
        "- ray: a local cluster started by the benchmark after the local rows (`ray.init(num_cpus=2)`, "
        f"loopback, no dashboard), one replica deployed once and warm for every ray row "
        f"(max_batch_size {meta['replica'].get('max_batch_size', '?')}, pid {meta['replica'].get('pid', '?')}); "
        "the replica, Ray's daemons, the front end and the load generator share the same cores",
        f"- clients: {meta['clients']}",
        f"- fixtures (session i streams fixture i mod 4): replies expected per session from an exact replay of the "
        f"same frames through ReplyOnPause: {meta['expected_per_fixture']}",
        "",
        "Columns: e2r = end of speech -> first reply byte; CPU in % of one core over the steady window "
        f"(all sessions streaming; the machine has {100 * m['usable_cpus']} %); RSS = peak in the row; "
        "front end = the uvicorn process (its whole tree); replica = the Serve replica's process; rest = the "
        "machine besides those and the load generator (Ray's daemons, the benchmark's driver, other jobs); VAD "
        "batches = batches the row ran and their mean size (from the front end's /metrics; ray: summed over the "
        "replicas, and the Serve calls).",
        "",
        HEADER,
        *[row_line(x, p95_ms) for x in rows],
        "",
        f"Criterion: a mode holds N when every reply arrives, with 0 errors, and e2r p95 <= {p95_ms:,.0f} ms:",
        *verdicts(rows, p95_ms),
    ]
    notes = []
    for x in rows:
        r = x["result"]
        tag = f"{r.mode} N={r.n}"
        if r.error_samples:
            notes.append(f"- {tag} errors, e.g.: {'; '.join(r.error_samples[:3])}")
        if r.mismatches:
            notes.append(f"- {tag}: {r.mismatches} session(s) whose pause_detected count/timing differed from the replay")
        if r.server_log_warnings:
            notes.append(f"- {tag}: {r.server_log_warnings} server log warning/error line(s), e.g. "
                         f"`{(r.server_log_sample or [''])[0][:200]}`")
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", default=DEFAULT_SESSIONS, help=f"comma-separated N (default {DEFAULT_SESSIONS})")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, of local, ray (in that order)")
    ap.add_argument("--p95-ms", type=float, default=P95_MS, help="e2r p95 bound for 'holds' (ms)")
    ap.add_argument("--fixtures", default="all", help="'all' (the four of bench_reply) or comma-separated WAV names")
    ap.add_argument("--tail-s", type=float, default=1.5, help="silence appended to each fixture (s)")
    ap.add_argument("--listen-s", type=float, default=2.5, help="listen after a session's last frame (s)")
    ap.add_argument("--stagger-s", type=float, default=0.6, help="session starts spread over this (s)")
    ap.add_argument("--client-procs", type=int, default=0, help="load-generator processes (0 = auto)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "bench_ray_sessions.md"))
    a = ap.parse_args(argv)
    a.sessions = [int(x) for x in a.sessions.split(",") if x.strip()]
    a.engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    if any(e not in ENGINES for e in a.engines):
        ap.error(f"--engines: of {', '.join(ENGINES)}")
    a.fixtures = list(br.FIXTURES) if a.fixtures == "all" else [f.strip() for f in a.fixtures.split(",")]
    code = code_version()
    machine = machine_info(("torch", "silero-vad", "ray", "websockets", "uvicorn", "uvloop"))
    t0 = time.monotonic()
    rows, info = run(a)
    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "command": command_line("benchmarks.bench_ray_sessions"),
        "code": code if code_version() == code else f"{code} at start, {code_version()} at the end",
        "clients": f"bench_reply's load generator: {a.client_procs or 'auto (1 process up to N=100)'} spawn "
        f"process(es), one {client_loop()} loop each; 20 ms mu-law frames at 48 kHz, no permessage-deflate; starts "
        f"staggered over {a.stagger_s} s, listening {a.listen_s} s after the last frame",
        "fixtures": a.fixtures,
        "p95_ms": a.p95_ms,
        "wall_s": round(time.monotonic() - t0, 1),
        **info,
    }
    text = render(rows, meta, a.p95_ms)
    data = {"meta": meta, "verdicts": verdicts(rows, a.p95_ms),
            "rows": [{**br.step_to_json(x["result"]), "vad": x["vad"], "replica_pids": x["replica_pids"],
                      "rest_cpu_pct": x["result"].other_cpu_pct, "holds": holds(x["result"], a.p95_ms)} for x in rows]}
    md, js = write_report(Path(a.out), text, json.loads(json.dumps(data, default=str)))
    print()
    print("\n".join(verdicts(rows, a.p95_ms)))
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
