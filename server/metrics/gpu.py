"""GPU readings through NVML (`nvidia-ml-py`): per device, nothing at all where it is missing."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class Nvml:
    """NVML, initialised once on first use; unavailable (silently) when it cannot be."""

    def __init__(self, loader: Callable[[], Any] | None = None) -> None:
        self._loader = loader or _import_pynvml
        self._lock = threading.Lock()
        self._mod: Any = None
        self._tried = False

    def module(self) -> Any:
        if self._tried:
            return self._mod
        with self._lock:
            if not self._tried:
                try:
                    mod = self._loader()
                    mod.nvmlInit()
                    self._mod = mod
                except Exception as e:  # no driver, no library, no GPU: no GPU series
                    logger.debug("NVML unavailable, GPU metrics disabled: %r", e)
                    self._mod = None
                self._tried = True
        return self._mod

    def devices(self) -> list[dict[str, Any]]:
        """One dict per GPU with whatever could be read (a failed query leaves a key out)."""
        nv = self.module()
        if nv is None:
            return []
        try:
            count = int(nv.nvmlDeviceGetCount())
        except Exception:
            logger.debug("nvmlDeviceGetCount failed", exc_info=True)
            return []
        out = []
        for i in range(count):
            dev: dict[str, Any] = {"index": str(i), "name": ""}
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
            except Exception:
                continue
            try:
                name = nv.nvmlDeviceGetName(h)
                dev["name"] = name.decode() if isinstance(name, bytes) else str(name)
            except Exception:
                pass
            try:
                dev["util"] = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:  # e.g. NotSupported on MIG instances
                pass
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                dev["mem_used"], dev["mem_total"] = float(mem.used), float(mem.total)
            except Exception:
                pass
            try:
                dev["temp"] = float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
            except Exception:
                pass
            out.append(dev)
        return out


def _import_pynvml() -> Any:
    import pynvml

    return pynvml


nvml = Nvml()
