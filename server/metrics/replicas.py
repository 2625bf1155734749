"""The Ray Serve engine replicas' statistics on a front end's `/metrics` (BATCHRTC_ENGINE=ray).

With the Ray engine the VAD batcher runs in the replicas, not in the front end, so the
front end's own batcher families say nothing about it. At scrape time this collector asks
every replica for its `stats()` (one Serve broadcast, `RayEngine.replica_stats`), at most
once per `ttl_s` however many scrapes come (every front end of a cluster is scraped, and each
would otherwise call every replica), and with a `timeout_s`: a scrape never waits longer for a
dead or hung replica. A fetch that fails shows as `batchrtc_replica_stats_up 0` and a count in
`batchrtc_replica_stats_failures_total`, never as a failed scrape.

Each replica's batcher is reported with the same families as a local batcher, named
`batchrtc_replica_batcher_*` and labelled by `replica` (Serve's replica id, the value of the
`replica` tag on Ray Serve's own metrics), plus its calls and items per replica.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .collector import _name, batcher_families

logger = logging.getLogger(__name__)

# fetch(timeout_s): None where there are no replicas to ask (not BATCHRTC_ENGINE=ray, or not
# started yet); else one entry per replica: its stats, or the exception its call raised. It
# raises when the fetch as a whole failed (TimeoutError past timeout_s, no replica, ...).
ReplicaStats = list[dict[str, Any] | BaseException]
Fetch = Callable[[float], ReplicaStats | None]


class ReplicaCollector(Collector):
    """Reads the engine replicas' statistics through `fetch`, cached for `ttl_s`."""

    def __init__(self, fetch: Fetch, *, ttl_s: float = 1.0, timeout_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fetch = fetch
        self.ttl_s, self.timeout_s = ttl_s, timeout_s
        self.clock = clock
        self.failures: Counter[str] = Counter({"timeout": 0, "error": 0, "replica": 0})
        self.fetches = 0
        self._lock = threading.Lock()  # one fetch at a time; scrapes meanwhile wait for it
        self._at: float | None = None  # when the cached result was fetched
        self._result: ReplicaStats | None = None
        self._ok = False

    def _refresh(self) -> None:
        now = self.clock()
        if self._at is not None and now - self._at < self.ttl_s:
            return
        try:
            result = self.fetch(self.timeout_s)
            ok = True
        except Exception as e:
            result, ok = [], False
            # Ray's broadcast raises the builtin TimeoutError (asyncio's is the same class).
            self.failures["timeout" if isinstance(e, TimeoutError) else "error"] += 1
            logger.warning("metrics: the engine replicas' statistics could not be fetched (%s: %s)",
                           type(e).__name__, str(e)[:200])
        self.fetches += 1
        if result:
            bad = sum(1 for r in result if isinstance(r, BaseException))
            self.failures["replica"] += bad
            ok = ok and not bad
        self._at, self._result, self._ok = self.clock(), result, ok

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            self._refresh()
            result, ok, at = self._result, self._ok, self._at
            failures = dict(self.failures)
        if result is None:  # no Ray engine: nothing to say
            return
        answered = [r for r in result if isinstance(r, dict)]
        yield GaugeMetricFamily(
            _name("replica_stats_up"),
            "1 when every engine replica answered the last fetch of its statistics; 0 when the "
            "fetch failed or timed out, or a replica's call failed.",
            value=1.0 if ok else 0.0,
        )
        c = CounterMetricFamily(
            _name("replica_stats_failures"),
            "Fetches of the engine replicas' statistics that failed, by reason: timeout, error "
            "(no replica, cluster unreachable...), replica (one replica's call failed).",
            labels=["reason"],
        )
        for reason, n in sorted(failures.items()):
            c.add_metric([reason], n)
        yield c
        yield GaugeMetricFamily(
            _name("replica_stats_age_seconds"),
            f"Age of the replica statistics shown (fetched at most once per {self.ttl_s:g} s).",
            value=max(0.0, self.clock() - at) if at is not None else 0.0,
        )
        yield GaugeMetricFamily(
            _name("replicas_answering"), "Engine replicas whose statistics the last fetch got.",
            value=float(len(answered)),
        )
        if not answered:
            return
        ids = [[str(r.get("replica", i))] for i, r in enumerate(answered)]
        info = GaugeMetricFamily(
            _name("replica_info"), "One engine replica: its Serve application, deployment and pid.",
            labels=["replica", "application", "deployment", "pid"],
        )
        calls = CounterMetricFamily(_name("replica_calls"), "Serve calls (bundles of chunks) a replica ran.",
                                    labels=["replica"])
        items = CounterMetricFamily(_name("replica_items"), "Chunks a replica received in its calls.",
                                    labels=["replica"])
        mixed = CounterMetricFamily(
            _name("replica_mixed_batches"), "A replica's batches that mixed chunks of several front ends.",
            labels=["replica"],
        )
        for rid, r in zip(ids, answered):
            info.add_metric([*rid, str(r.get("application", "")), str(r.get("deployment", "")),
                             str(r.get("pid", ""))], 1.0)
            calls.add_metric(rid, r["calls"])
            items.add_metric(rid, r["items"])
            mixed.add_metric(rid, r["mixed_batches"])
        yield from (info, calls, items, mixed)
        yield from batcher_families(list(zip(ids, answered)), ["replica"], prefix="replica_batcher")
