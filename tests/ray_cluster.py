"""A local Ray cluster for the BATCHRTC_ENGINE=ray tests (they skip without Ray)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NEED_RAY = "BATCHRTC_ENGINE=ray needs Ray Serve: pip install -e \".[ray]\""


@contextlib.contextmanager
def local_ray_cluster() -> Iterator[str]:
    """Start Ray in this process (2 CPUs, loopback, no dashboard) and yield its GCS address;
    Serve and Ray are shut down after. Its workers (the Serve replicas) import this checkout:
    PYTHONPATH is set before it starts, and put back after. Skips the test without Ray."""
    ray = pytest.importorskip("ray", reason=NEED_RAY)
    serve = pytest.importorskip("ray.serve", reason=NEED_RAY)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), saved) if p)
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved
