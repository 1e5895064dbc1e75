"""How records and tables name the machine they ran on; torch-free, so a benchmark that only drives
subprocesses (benchmarks/corpus_scale.py) names its CPU without importing torch."""

from __future__ import annotations

import os
import platform

__all__ = ["cpu_model", "cpu_device"]


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), or its architecture where the system does not
    say: records name it because two CPUs of one architecture train and time differently (the same recipe gave
    other weights on another x86_64)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_device(threads: int | None = None, cores: bool = False) -> str:
    """How records and tables name a CPU: "CPU (x86_64, AMD EPYC)", with ", 2 cores" and ", 1 thread" where
    asked (the benchmarks that time say both)."""
    parts = [platform.machine(), cpu_model()]
    if cores:
        parts.append(f"{os.cpu_count()} cores")
    if threads is not None:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    return f"CPU ({', '.join(dict.fromkeys(parts))})"
