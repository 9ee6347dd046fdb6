"""Size a run: GPUs per stage pool, pool ratios, wall hours and cost, for N images on one GPU type.

Each GPU pool's throughput per GPU comes from a measurement when one matches (``bench/stage1.py`` and
``bench/stage2.py`` write :class:`BenchStage` records with ``--json``: same pool, same card, same engine
or editor), otherwise from a FLOP count (labelled *estimate*): the denoiser counts of
``docs/benchmarks.md`` for stage 2 and 2 × parameters × tokens for the stage-1 models, at an assumed
utilisation of the card's peak dense bf16 rate. The pools stream side by side, so GPUs are split in
proportion to each pool's GPU-hours and the run lasts as long as its slowest pool.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from u2s.cluster import NodeGroup
from u2s.config import JobConfig, Resources


@dataclass(frozen=True)
class Card:
    """A GPU type: peak dense bf16 (= fp16) tensor rate, memory, and an approximate hourly price per GPU."""

    name: str
    peak_tflops: float
    memory_gb: int
    usd_per_hour: float


#: Peak rates from NVIDIA's data sheets (dense, no sparsity). Prices: approximate on-demand cloud list
#: prices per GPU-hour (AWS us-east-1, 2025: p5, p5en, p4de, g6e, g6 divided by their GPU count); check
#: your provider's and pass --price.
CARDS: dict[str, Card] = {
    "H100": Card("H100", 989.0, 80, 6.88),
    "H200": Card("H200", 989.0, 141, 7.91),
    "A100": Card("A100", 312.0, 80, 3.43),
    "L40S": Card("L40S", 362.0, 48, 1.86),
    "L4": Card("L4", 121.0, 24, 0.80),
}

#: Assumed fraction of peak reached: compute-bound work (prompt prefill, diffusion denoising) and batched
#: decoding (memory-bound: an 8B model at 64 sequences a step reads its weights once per ~64 tokens).
COMPUTE_UTILISATION = 0.40
DECODE_UTILISATION = 0.15

#: Stage-1 models assumed by estimates (the paper's): parameters, and tokens per call (prompt, output).
VLM_PARAMS, LLM_PARAMS = 8.1e9, 4.02e9  # InternVL2.5-8B (InternViT-300M + InternLM2.5-7B), Qwen3-4B
CALL_TOKENS: dict[str, tuple[int, int]] = {
    "inspect": (256 + 300, 16),  # one 448 px tile (256 vision tokens) + flag question; a short JSON flag
    "describe": (256 + 450, 350),  # image + dual-caption instructions; two captions and a review
    "instruct": (350, 60),  # public caption + instructions; one edit phrase
    "combine": (400, 60),  # caption + edit; one caption under 50 words
}
VISION_CALLS = ("inspect", "describe")

#: Denoiser TFLOP per step for one image at 512×512 (docs/benchmarks.md, counted with FlopCounterMode;
#: FLUX Kontext: 2 × 11.9B parameters × 2560 tokens, not counted there). VAE and text encoders excluded.
DENOISER_TFLOP_PER_STEP = {"instruct_pix2pix": 2.41, "safe_attention": 2.41, "flowedit_sd3": 8.43,
                           "flux_kontext": 61.0}  # fmt: skip


class BenchStage(BaseModel):
    """One measured throughput of one pool, as bench scripts write it under ``stages`` in their --json."""

    model_config = ConfigDict(extra="forbid")

    pool: str = Field(
        ..., description="Pool name, as `u2s.pipeline.stage_pools` names it (edit, inspect+describe...)."
    )
    rows_per_s: float = Field(..., gt=0, description="Rows per second of one replica.")
    gpus: float = Field(1.0, ge=0, description="GPUs the replica used; 0: measured on the CPU.")
    card: str = Field(..., description="Device name, e.g. 'NVIDIA H100 80GB HBM3'.")
    engine: str | None = Field(None, description="Stage 1: the engine measured.")
    editor: str | None = Field(None, description="Stage 2: the editor measured.")
    script: str = Field(..., description="The script that measured it.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Batch size, resolution, steps...")


@dataclass
class Rate:
    """Throughput of one pool per GPU, and where the figure comes from."""

    rows_per_s: float
    measured: bool
    source: str


@dataclass
class PoolPlan:
    name: str
    request: Resources
    rows: float
    rate: Rate | None  # None: a CPU pool (not sized here)
    card: Card | None = None
    price: float = 0.0  # USD per GPU-hour
    gpu_hours: float = 0.0
    gpus: float = 0.0

    @property
    def replicas(self) -> int:
        return round(self.gpus / self.request.num_gpus) if self.request.num_gpus else 0


@dataclass
class Plan:
    images: int
    card: Card
    price: float
    flagged: float
    pools: list[PoolPlan]
    gpus: float
    wall_hours: float
    ignored: list[str]
    paths: dict[str, str]

    @property
    def gpu_pools(self) -> list[PoolPlan]:
        return [p for p in self.pools if p.rate is not None]

    @property
    def gpu_hours(self) -> float:
        return sum(p.gpu_hours for p in self.gpu_pools)

    @property
    def cost(self) -> float:
        """Every GPU held for the whole run (pools stream side by side)."""
        return self.wall_hours * sum(p.gpus * p.price for p in self.gpu_pools)


def card_for(name: str) -> Card:
    for key, card in CARDS.items():
        if key.lower() == name.lower():
            return card
    raise ValueError(f"unknown GPU type {name!r}; known: {', '.join(CARDS)}")


def parse_pool_cards(items: list[str]) -> dict[str, Card]:
    """``["edit=L40S"]`` → ``{"edit": CARDS["L40S"]}`` (``--pool-gpu``)."""
    cards = {}
    for item in items:
        pool, sep, name = item.partition("=")
        if not sep:
            raise ValueError(f"--pool-gpu {item!r}: expected POOL=TYPE, e.g. edit=L40S")
        cards[pool.strip()] = card_for(name.strip())
    return cards


def same_card(device_name: str, card: Card) -> bool:
    """Whether a device name (``torch.cuda.get_device_name()``) is this card type."""
    tokens = device_name.upper().replace("-", " ").split()
    return card.name.upper() in tokens


def read_bench(paths: list[str | Path]) -> list[BenchStage]:
    """The ``stages`` records of bench --json files."""
    found: list[BenchStage] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        found += [BenchStage.model_validate(s) for s in data.get("stages", [])]
    return found


def pool_calls(pool: str) -> list[str]:
    """The stage-1 calls a pool runs (pools are named by their calls: ``inspect+describe``)."""
    return pool.split("+")


def pool_rows(pool: str, images: int, flagged: float) -> float:
    """Rows a pool processes: pools with inspect, decode and write see every image, the rest only
    flagged ones."""
    return float(images) if pool in ("decode", "write") or "inspect" in pool_calls(pool) else images * flagged


def stage1_tflop_per_row(cfg: JobConfig, pool: str, flagged: float) -> tuple[float, float]:
    """(prefill, decode) TFLOP per row of a stage-1 pool, by 2 × parameters × tokens, summed over its calls
    (in a pool that also inspects, the later calls run on the flagged share of its rows only)."""

    def call(name: str) -> tuple[float, float]:
        prompt, output = CALL_TOKENS[name]
        params = VLM_PARAMS if name in VISION_CALLS else LLM_PARAMS
        return 2 * params * prompt / 1e12, 2 * params * output / 1e12

    s1 = cfg.stage1
    calls = pool_calls(pool)
    prefill = decode = 0.0
    for name in calls:
        share = flagged if "inspect" in calls and name != "inspect" else 1.0
        if name == "inspect" and s1.mode == "fused":  # one call per row: short unless flagged
            (pa, da), (pb, db) = call("inspect"), call("describe")
            p, d = pa * (1 - flagged) + pb * flagged, da * (1 - flagged) + db * flagged
        else:
            p, d = call(name)
            if name == "inspect" and s1.inspect_mode == "per_criterion":
                p, d = 9 * p, 9 * d
        prefill, decode = prefill + share * p, decode + share * d
    return prefill, decode


def edit_tflop_per_row(cfg: JobConfig) -> float | None:
    """Denoiser TFLOP per edited image (docs/benchmarks.md counts, scaled by steps and pixels)."""
    s2 = cfg.stage2
    per_step = DENOISER_TFLOP_PER_STEP.get(s2.editor)
    if per_step is None:
        return None
    editor = s2.section()
    steps = editor.num_inference_steps
    if s2.editor == "flowedit_sd3":  # native size, long side up to max_side: assume a 1024 px average
        steps = min(editor.n_max, steps) * editor.n_avg
        return per_step * steps * (min(editor.max_side, 1024) / 512) ** 2
    return per_step * steps * (getattr(editor, "resolution", 512) / 512) ** 2


def estimate_rate(cfg: JobConfig, pool: str, card: Card, flagged: float) -> Rate | None:
    peak = card.peak_tflops
    if pool == "edit":
        tflop = edit_tflop_per_row(cfg)
        if tflop is None:
            return None
        seconds = tflop / (peak * COMPUTE_UTILISATION)
        label = f"estimate: {tflop:.0f} TFLOP/image at {COMPUTE_UTILISATION:.0%} of peak"
        return Rate(1 / seconds, False, label)
    if all(name in CALL_TOKENS for name in pool_calls(pool)):
        prefill, decode = stage1_tflop_per_row(cfg, pool, flagged)
        seconds = prefill / (peak * COMPUTE_UTILISATION) + decode / (peak * DECODE_UTILISATION)
        label = (f"estimate: {prefill + decode:.2f} TFLOP/row at {COMPUTE_UTILISATION:.0%} (prefill) / "
                 f"{DECODE_UTILISATION:.0%} (decode) of peak")  # fmt: skip
        return Rate(1 / seconds, False, label)
    return None


def measured_rate(
    cfg: JobConfig, pool: str, card: Card, bench: list[BenchStage], ignored: list[str]
) -> Rate | None:
    """The best matching measurement of ``pool`` on ``card``; mismatches are noted in ``ignored``."""
    best: BenchStage | None = None
    for m in bench:
        if m.pool != pool:
            continue
        why = None
        if m.gpus == 0:
            why = f"measured on the CPU ({m.card})"
        elif not same_card(m.card, card):
            why = f"measured on {m.card}, not {card.name}"
        elif pool == "edit" and m.editor != cfg.stage2.editor:
            why = f"editor {m.editor}, config uses {cfg.stage2.editor}"
        elif pool != "edit" and m.engine != cfg.stage1.engine_for(pool_calls(pool)[0]):
            why = f"engine {m.engine}, config uses {cfg.stage1.engine_for(pool_calls(pool)[0])}"
        if why:
            ignored.append(f"{pool} ({m.script}): {why}")
        elif best is None or m.rows_per_s / m.gpus > best.rows_per_s / best.gpus:
            best = m
    if best is None:
        return None
    settings = ", ".join(f"{k} {v}" for k, v in best.settings.items())
    what = best.editor or best.engine or ""
    return Rate(best.rows_per_s / best.gpus, True, f"measured: {what} on {best.card} ({settings})")


def find_path(model: BaseModel, target: object, prefix: str = "") -> str | None:
    """The dotted config path of the object ``target`` inside ``model`` (by identity)."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if value is target:
            return path
        if isinstance(value, BaseModel):
            found = find_path(value, target, path + ".")
            if found:
                return found
    return None


def allocate(pools: list[PoolPlan], total: float) -> None:
    """Split ``total`` GPUs over the pools in proportion to their GPU-hours, whole replicas, one at least."""
    units = [max(p.request.num_gpus, 1e-9) for p in pools]
    replicas = [1] * len(pools)
    spare = total - sum(units)
    while spare > 1e-9:  # give the next replica to the pool that ends last
        finish = [p.gpu_hours / (r * u) for p, r, u in zip(pools, replicas, units, strict=True)]
        order = sorted(range(len(pools)), key=lambda i: -finish[i])
        for i in order:
            if units[i] <= spare + 1e-9:
                replicas[i] += 1
                spare -= units[i]
                break
        else:
            break
    for p, r, u in zip(pools, replicas, units, strict=True):
        p.gpus = r * u


def make_plan(
    cfg: JobConfig,
    images: int,
    card: Card,
    bench: list[BenchStage] | None = None,
    flagged: float = 0.5,
    gpus: int | None = None,
    hours: float = 24.0,
    price: float | None = None,
    pool_cards: dict[str, Card] | None = None,
) -> Plan:
    """Size every GPU pool of ``cfg`` for ``images`` images on ``card`` (``pool_cards``: other GPU types
    for some pools, e.g. the editor on L40S; ``price`` applies to ``card``). See the module docstring."""
    from u2s.pipeline import stage_pools

    ignored: list[str] = []
    pools, paths = [], {}
    unknown = set(pool_cards or {}) - set(stage_pools(cfg))
    if unknown:
        raise ValueError(f"no pool named {', '.join(sorted(unknown))} in this config")
    for name, request in stage_pools(cfg).items():
        rate = None
        pool_card = (pool_cards or {}).get(name, card)
        if request.num_gpus > 0:
            rate = measured_rate(cfg, name, pool_card, bench or [], ignored) or estimate_rate(
                cfg, name, pool_card, flagged
            )
            if rate is None:
                raise ValueError(f"pool {name!r} asks for a GPU but has no figure (measured or estimated)")
        pool_price = price if price is not None and pool_card is card else pool_card.usd_per_hour
        plan = PoolPlan(name, request, pool_rows(name, images, flagged), rate, pool_card, pool_price)
        if rate is not None:
            plan.gpu_hours = plan.rows / rate.rows_per_s / 3600
        pools.append(plan)
        path = find_path(cfg, request)
        if path:
            paths[name] = path
    gpu_pools = [p for p in pools if p.rate is not None]
    if gpu_pools:
        if gpus is None:  # enough for `hours`: each pool's share, rounded up to whole replicas
            gpus_needed = 0.0
            for p in gpu_pools:
                gpus_needed += math.ceil(p.gpu_hours / hours / p.request.num_gpus) * p.request.num_gpus
            total = max(gpus_needed, sum(p.request.num_gpus for p in gpu_pools))
        else:
            total = float(gpus)
        allocate(gpu_pools, total)
    used = sum(p.gpus for p in gpu_pools)
    wall = max((p.gpu_hours / p.gpus for p in gpu_pools), default=0.0)
    return Plan(images, card, card.usd_per_hour if price is None else price, flagged, pools, used, wall,
                ignored, paths)  # fmt: skip


def group_shortfalls(plan: Plan, groups: list[NodeGroup]) -> list[str]:
    """Groups too small for the GPUs the plan gives the pools pinned to them (pools that fit one group)."""
    from u2s.cluster import placement

    fits = placement({p.name: p.request for p in plan.pools}, groups)
    wanted: dict[str, float] = {}
    for p in plan.gpu_pools:
        if len(fits[p.name]) == 1:
            wanted[fits[p.name][0]] = wanted.get(fits[p.name][0], 0.0) + p.gpus
    short = []
    for g in groups:
        have = g.max_workers * g.resources.get("GPU", 0)
        if g.name in wanted and wanted[g.name] > have:
            nodes = math.ceil(wanted[g.name] / g.resources["GPU"])
            short.append(f"{g.name} needs {nodes} nodes for {wanted[g.name]:g} GPUs, it allows "
                         f"{g.max_workers} (raise max_workers / maxReplicas or plan fewer GPUs)")  # fmt: skip
    return short


def format_plan(plan: Plan, groups: list[NodeGroup] | None = None) -> str:
    """The plan as a table, totals, and the pool sizes to put in the config; with a cluster config's
    ``groups``, which groups each pool fits and whether they are large enough."""
    lines = [
        f"u2s plan: {plan.images:,} images on {plan.card.name} (${plan.price:.2f}/GPU-hour), "
        f"{plan.flagged:.0%} of them flagged (assumed; --flagged)",
        "",
        f"{'pool':<17}{'rows':>12}  {'per GPU':>13}  {'GPU-h':>9}  {'share':>6}  {'GPUs':>5} type  source",
    ]
    for p in plan.gpu_pools:
        assert p.rate is not None and p.card is not None
        share = p.gpus / plan.gpus if plan.gpus else 0.0
        rate, source = p.rate.rows_per_s, p.rate.source
        lines.append(f"{p.name:<17}{p.rows:>12,.0f}  {rate:>8.3f} /s  {p.gpu_hours:>9,.1f}  {share:>6.1%}  "
                     f"{p.gpus:>5g} {p.card.name:<5} {source}")  # fmt: skip
    cpu = [p for p in plan.pools if p.rate is None]
    if cpu:
        listed = ", ".join(f"{p.name} ({p.request.num_cpus:g} CPU each)" for p in cpu)
        lines.append(f"CPU pools, not sized here: {listed}")
    lines += [
        "",
        f"total: {plan.gpu_hours:,.1f} GPU-hours; {plan.gpus:g} GPUs -> {plan.wall_hours:,.1f} h wall; "
        f"cost ~${plan.cost:,.0f} (every GPU held for the whole run, at its $/GPU-hour)",
    ]
    if plan.ignored:
        lines += ["measurements not used:", *(f"  {reason}" for reason in plan.ignored)]
    lines += ["", "pool sizes for the config (autoscaling pools: [min, max] actors):"]
    for p in plan.gpu_pools:
        where = plan.paths.get(p.name, p.name)
        lines.append(f"  --set '{where}.pool_size=[1,{p.replicas}]'   # {p.request.num_gpus:g} GPU per actor")
    if groups is not None:
        from u2s.cluster import placement as fit

        placement = fit({p.name: p.request for p in plan.pools}, groups)
        lines += ["", "worker groups each pool fits (one actor per node):"]
        for name, names in placement.items():
            lines.append(f"  {name:<17}{', '.join(names) if names else 'NONE: no group can run it'}")
        loose = [p.name for p in plan.gpu_pools if len(placement.get(p.name, [])) > 1]
        if loose:
            lines.append(f"  ({', '.join(loose)}: no accelerator_type, so any of those groups; set "
                         "<pool>.accelerator_type to pin a pool to its group)")  # fmt: skip
        lines += [f"  too small: {line}" for line in group_shortfalls(plan, groups)]
    return "\n".join(lines)
