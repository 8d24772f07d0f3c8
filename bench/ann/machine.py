"""What a result was measured on: machine, library versions, thread settings."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

PACKAGES = ("numpy", "torch", "faiss-cpu", "faiss-gpu", "hnswlib", "grpcio", "protobuf", "retrieval-service")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def machine_info() -> dict[str, Any]:
    import psutil

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "gpu": None,
        # other processes' load when the run ended: on a shared machine, read QPS in its light
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # torch missing or broken CUDA: report no GPU
        pass
    return info


def set_threads(n: int) -> None:
    """Limit BLAS / OpenMP / torch / faiss to ``n`` threads (the benchmark default is 1, as BASELINES.md)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        import torch

        torch.set_num_threads(n)
    except Exception:  # torch absent: nothing to limit
        pass
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except Exception:  # faiss absent
        pass
