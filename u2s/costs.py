"""The cost model of a run: GPU-seconds per model call and CPU-seconds per row, for ``u2s plan`` and for
the simulated cluster (``bench/cluster_sim.py``), which both read it from here.

GPU side, from FLOP counts (:mod:`u2s.plan` counts them per row) at an assumed share of the card's peak:

* an editor call of ``n`` images holds its GPU ``t = a + b·n``: ``b`` is one image's denoiser FLOPs at
  :data:`COMPUTE_UTILISATION`, ``a`` the call's fixed part (launches, schedulers, small kernels), taken as
  :data:`EDIT_CALL_IMAGES` images' worth of ``b`` (assumed: diffusion throughput reaches about half its
  plateau at batch 4 and most of it by batch 32, as in Ray's Stable Diffusion benchmark);
* a vLLM engine batches continuously: it runs decoding steps of up to ``max_num_seqs`` sequences, and a
  step costs the same however many are in flight (decoding reads the weights once a step: memory-bound),
  so a request of ``w`` GPU-seconds at full occupancy (prefill at :data:`COMPUTE_UTILISATION`, decoding at
  :data:`DECODE_UTILISATION`) occupies one slot for ``w · max_num_seqs`` seconds
  (:class:`ContinuousBatching`).

CPU side: the CPU-seconds per row spent outside the models (listing, fetch, decode, metadata strip,
thumbnail, re-encode, Parquet write), measured by ``bench/cluster_sim.py`` on the real plan
(:data:`RECORDED_CPU_COST`; ``--cpu-json`` writes a file :func:`load_cpu_cost` reads).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

#: Assumed fraction of peak reached: compute-bound work (prompt prefill, diffusion denoising) and batched
#: decoding (memory-bound: an 8B model at 64 sequences a step reads its weights once per ~64 tokens).
COMPUTE_UTILISATION = 0.40
DECODE_UTILISATION = 0.15
#: An editor call's fixed time, in images' worth of denoising (see the module docstring; assumed).
EDIT_CALL_IMAGES = 4.0


def stage1_seconds(prefill_tflop: float, decode_tflop: float, peak_tflops: float) -> float:
    """GPU-seconds of one row's stage-1 work on a card of ``peak_tflops``, at full occupancy."""
    return prefill_tflop / (peak_tflops * COMPUTE_UTILISATION) + decode_tflop / (
        peak_tflops * DECODE_UTILISATION
    )


@dataclass(frozen=True)
class CallCost:
    """Seconds one call of ``n`` items holds its GPU: ``a + b·n``."""

    a: float
    b: float

    def seconds(self, n: int) -> float:
        return self.a + self.b * n if n else 0.0

    def rate(self, n: int) -> float:
        """Items per second of back-to-back calls of ``n`` items."""
        return n / self.seconds(n)

    def scaled(self, factor: float) -> CallCost:
        """The same card ``factor`` times slower (the simulator's speeds, scaled to what its CPUs feed)."""
        return CallCost(self.a * factor, self.b * factor)


def editor_call_cost(tflop_per_image: float, peak_tflops: float) -> CallCost:
    """The editor's ``a + b·n`` on a card of ``peak_tflops`` (see the module docstring)."""
    b = tflop_per_image / (peak_tflops * COMPUTE_UTILISATION)
    return CallCost(EDIT_CALL_IMAGES * b, b)


@dataclass(frozen=True)
class ContinuousBatching:
    """A vLLM engine's timing: steps of ``step_s`` seconds, up to ``max_num_seqs`` sequences a step.

    A request of ``w`` GPU-seconds at full occupancy takes :meth:`steps` steps; a call of ``n`` requests
    on an idle engine lasts ``steps · step_s · ceil(n / max_num_seqs)`` (``a = 0``; full waves), and the
    engine's capacity is ``max_num_seqs / (steps · step_s)`` requests a second of that size.
    """

    step_s: float
    max_num_seqs: int

    def steps(self, seconds_at_full: float) -> int:
        return max(1, round(seconds_at_full * self.max_num_seqs / self.step_s))

    def call_seconds(self, seconds_at_full: float, n: int) -> float:
        return self.steps(seconds_at_full) * self.step_s * math.ceil(n / self.max_num_seqs)


@dataclass(frozen=True)
class CpuCost:
    """CPU-seconds per input row outside the model calls, and where the figure comes from."""

    seconds_per_row: float
    source: str

    def cores(self, rows_per_s: float) -> float:
        """CPU cores busy at ``rows_per_s`` rows a second."""
        return rows_per_s * self.seconds_per_row


#: The figure ``bench/cluster_sim.py`` recorded (docs/benchmarks.md, "Simulated GPU cluster"): 1 000
#: COCO-like JPEGs at 25% flags on a 2-core VM under other load, Ray's and the actors' start-up included, so
#: an upper bound (the steps alone cost ~12 ms per kept COCO image on one core: ``bench/cpu_per_image.py``).
RECORDED_CPU_COST = CpuCost(
    0.142, "recorded: bench/cluster_sim.py, 1,000 COCO-like JPEGs, 25% flagged, 2-core VM, start-up included"
)


def load_cpu_cost(value: str | Path) -> CpuCost:
    """``--cpu-cost``: CPU-seconds per row as a number, or the JSON ``bench/cluster_sim.py --cpu-json``
    writes (``{"cpu_seconds_per_row": ..., "source": ...}``)."""
    try:
        return CpuCost(float(value), "--cpu-cost")
    except ValueError:
        pass
    data = json.loads(Path(value).read_text())
    return CpuCost(float(data["cpu_seconds_per_row"]), f"{value}: {data.get('source', 'bench JSON')}")
