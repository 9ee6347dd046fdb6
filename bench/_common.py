"""Helpers shared by the benchmark scripts: machine facts, tables, JSON output, GPU preconditions."""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import math
import os
import platform
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``; "-" for a missing or NaN figure."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def cpu_name() -> str:
    """The CPU model (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def machine_info(packages: tuple[str, ...]) -> dict[str, Any]:
    """CPU, cores, Python, installed versions of ``packages`` and the load average at the start."""
    info: dict[str, Any] = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()}
    for package in packages:
        with contextlib.suppress(PackageNotFoundError):
            info[package] = version(package)
    info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def free_memory() -> None:
    """Collect garbage and release cached CUDA memory between measurements."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def markdown_table(headers: list[str], cells: list[list[str]]) -> str:
    """A Markdown table, columns padded to their widest cell (pastes into docs as is)."""
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    lines = [" | ".join(s.ljust(w) for s, w in zip(row, widths, strict=True)) for row in [headers, *cells]]
    return "\n".join([f"| {lines[0]} |", rule, *(f"| {line} |" for line in lines[1:])])


def write_json(
    path: str,
    mode: str,
    info: dict[str, Any],
    key: str,
    records: list[Any],
    quiet: bool = False,
    stages: list[Any] | None = None,
) -> None:
    """The figures as JSON: ``{"mode", "info", key: [record.to_json() ...], "stages": [...]}``.

    ``stages`` are `u2s.plan.BenchStage` records, the per-pool figures `u2s plan --bench` reads.
    """
    payload = {"mode": mode, "info": info, key: [record.to_json() for record in records],
               "stages": [stage.model_dump(mode="json") for stage in stages or []]}  # fmt: skip
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
    if not quiet:
        print(f"\nwrote {path}")


def check_gpu_environment(dry_run: bool, modules: tuple[str, ...]) -> None:
    """Exit with a clear message when the GPU mode cannot run here (before building anything)."""
    for module in ("torch", *modules):
        try:
            importlib.import_module(module)
        except ImportError as e:
            sys.exit(
                f"error: {e.name} is not installed; on a GPU machine carry it as a wheel (docs/benchmarks.md)"
            )
    import torch

    if not dry_run and not torch.cuda.is_available():
        sys.exit(
            f"error: --gpu needs CUDA, and torch.cuda.is_available() is False here (torch "
            f"{torch.__version__}); use --gpu --dry-run to exercise the GPU path on the CPU"
        )
