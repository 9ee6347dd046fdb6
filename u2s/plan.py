"""Size a run: GPUs per stage pool, pool ratios, wall hours and cost, for N images on one GPU type.

Each GPU pool's throughput per GPU comes from a measurement when one matches (``bench/stage1.py`` and
``bench/stage2.py`` write :class:`BenchStage` records with ``--json``: same pool, same card, same engine
or editor), otherwise from a FLOP count (labelled *estimate*): the denoiser counts of
``docs/benchmarks.md`` for stage 2 and 2 × parameters × tokens for the stage-1 models, at an assumed
utilisation of the card's peak dense bf16 rate. The pools stream side by side, so GPUs are split in
proportion to each pool's GPU-hours and the run lasts as long as its slowest pool. The GPU-side timing
(an editor call's ``a + b·n``, FLOPs to seconds) is :mod:`u2s.costs`, which the simulated cluster
(``bench/cluster_sim.py``) runs too; so are the CPU-seconds per row that size the CPU cores each GPU needs
(measured by that bench, or ``--cpu-cost``).

Prices come from one table, :mod:`u2s.instances` (on-demand list prices of the instance types the
cluster configs name). Without a cluster config a card is priced as the instance type named for it in
:data:`CARDS`, and only the GPUs are counted. With one (:class:`Cluster`), every node the run holds is
priced by its group's instance type: the GPU nodes each pool needs, the head and the CPU workers, for
the whole wall time; the plan also says which groups each pool fits (an engine's tensor-parallel workers
must share one node) and which groups, or the launcher's global ``max_workers``, are too small for it.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from u2s.cluster import NodeGroup
from u2s.config import JobConfig, Resources
from u2s.costs import (
    COMPUTE_UTILISATION,
    DECODE_UTILISATION,
    EDIT_CALL_IMAGES,
    RECORDED_CPU_COST,
    CpuCost,
    editor_call_cost,
    stage1_seconds,
)
from u2s.instances import InstanceType, instance_type
from u2s.stage1.calls import CALLS

PRICES = "u2s/instances.py: AWS us-east-1 on-demand list prices"


@dataclass(frozen=True)
class Card:
    """A GPU type: peak dense bf16 (= fp16) tensor rate, memory, and the instance type that prices it.

    ``instance``: an entry of :data:`u2s.instances.INSTANCE_TYPES`, whose price per GPU is the card's;
    ``list_price``/``list_source``: only for a card no instance type in that table carries.
    """

    name: str
    peak_tflops: float
    memory_gb: int
    instance: str | None = None
    list_price: float | None = None
    list_source: str = ""

    @property
    def usd_per_hour(self) -> float:
        """USD per GPU-hour."""
        if self.instance:
            return instance_type(self.instance).usd_per_gpu_hour
        assert self.list_price is not None
        return self.list_price

    @property
    def price_source(self) -> str:
        if self.instance:
            node = instance_type(self.instance)
            per = f" / {node.gpus} GPUs" if node.gpus > 1 else ""
            return f"{node.name} ${node.usd_per_hour:,.3f}/h{per}"
        return self.list_source


#: Peak rates from NVIDIA's data sheets (dense, no sparsity). Each card is priced as the instance type
#: the cluster configs use for it (one GPU a node where AWS has one), from u2s/instances.py; check your
#: provider's prices and pass --price.
CARDS: dict[str, Card] = {
    "H100": Card("H100", 989.0, 80, "p5.4xlarge"),
    "H200": Card("H200", 989.0, 141, "p5en.48xlarge"),
    "A100": Card("A100", 312.0, 80, "p4de.24xlarge"),
    "L40S": Card("L40S", 362.0, 48, "g6e.2xlarge"),
    "L4": Card("L4", 121.0, 24, "g6.2xlarge"),
}  # fmt: skip


#: Stage-1 models assumed by estimates (the paper's): parameters, and tokens per call (prompt, output).
VLM_PARAMS, LLM_PARAMS = 8.1e9, 4.02e9  # InternVL2.5-8B (InternViT-300M + InternLM2.5-7B), Qwen3-4B
#: Tokens per call (prompt, output) of the calls registered at import; each call declares its own
#: (:attr:`u2s.stage1.calls.CallSpec.plan_tokens`).
CALL_TOKENS: dict[str, tuple[int, int]] = {name: spec.plan_tokens for name, spec in CALLS.items()}

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


@dataclass(frozen=True)
class Replica:
    """One actor of a pool as the cluster sees it: the GPUs it holds, and what one node must hold for it.

    A vLLM engine with tensor × pipeline parallelism has several workers: ``mp`` runs them in the actor's
    node, the "ray" executor in the actor's placement group, ``STRICT_PACK`` by default (one node too);
    a configured group with another strategy may spread them, so one node needs only its largest bundle.
    """

    gpus: float
    node: Resources
    workers: int = 1
    strategy: str | None = None

    @property
    def one_node(self) -> bool:
        return self.workers == 1 or self.strategy in (None, "STRICT_PACK")


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
    replica: Replica | None = None
    price_source: str = ""
    group: str | None = None  # with a cluster: the group its nodes are priced as
    nodes: int = 0  # nodes of that group the pool holds
    node_price: float = 0.0  # USD per node-hour

    def __post_init__(self) -> None:
        if self.replica is None:
            self.replica = Replica(self.request.num_gpus, self.request)

    @property
    def gpus_per_replica(self) -> float:
        assert self.replica is not None
        return self.replica.gpus

    @property
    def replicas(self) -> int:
        return round(self.gpus / self.gpus_per_replica) if self.gpus_per_replica else 0

    @property
    def usd_per_hour(self) -> float:
        """What the pool's GPUs cost an hour: whole nodes of its group, or GPUs at the card's price."""
        return self.nodes * self.node_price if self.group else self.gpus * self.price


@dataclass(frozen=True)
class Cluster:
    """A cluster config: its node groups and the launcher's cap on worker nodes of all types together."""

    groups: list[NodeGroup]
    max_workers: int | None = None
    source: str = ""


def load_cluster(path: str | Path) -> Cluster:
    """A KubeRay manifest or cluster-launcher YAML (see :mod:`u2s.cluster`)."""
    from u2s.cluster import launcher_max_workers, load_node_groups

    return Cluster(load_node_groups(path), launcher_max_workers(path), str(path))


@dataclass
class Nodes:
    """Nodes of one group the run holds for the whole wall time, and their price."""

    role: str  # "head", "CPU workers"
    group: str
    count: int
    instance: str | None
    usd_per_hour: float | None  # per node; None: not priced (no known instance type)
    note: str = ""


@dataclass
class ClusterFit:
    """Where a plan's pools land on a cluster, the other nodes it holds, and what is too small."""

    cluster: Cluster
    placement: dict[str, list[str]]  # pool -> worker groups one of its actors fits on
    tp_blocked: dict[str, str]  # pool -> why no node holds one of its actors (tensor parallelism)
    nodes: list[Nodes]  # head and CPU workers
    too_small: list[str]
    notes: list[str] = field(default_factory=list)


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
    fit: ClusterFit | None = None
    verify_fail: float = 0.0  # stage2.verify: share of verifications assumed to fail (each one re-edits)
    cpu_cost: CpuCost = RECORDED_CPU_COST  # CPU-seconds per row outside the models
    edit_fill: str = ""  # how full the editor's calls are expected to be (edit_fill_line)

    @property
    def cpu_cores(self) -> float:
        """CPU cores busy with the non-model work (fetch, decode, thumbnails, encode, write) while the GPUs
        run: rows per second over the wall time x CPU-seconds per row."""
        return self.cpu_cost.cores(self.images / (self.wall_hours * 3600)) if self.wall_hours else 0.0

    @property
    def gpu_pools(self) -> list[PoolPlan]:
        return [p for p in self.pools if p.rate is not None]

    @property
    def gpu_hours(self) -> float:
        return sum(p.gpu_hours for p in self.gpu_pools)

    @property
    def gpu_cost(self) -> float:
        """Every GPU (with a cluster: every GPU node) held for the whole run (pools stream side by side)."""
        return self.wall_hours * sum(p.usd_per_hour for p in self.gpu_pools)

    @property
    def node_cost(self) -> float:
        """The head and CPU workers (with a cluster), held for the whole run."""
        if self.fit is None:
            return 0.0
        return self.wall_hours * sum(n.count * (n.usd_per_hour or 0.0) for n in self.fit.nodes)

    @property
    def cost(self) -> float:
        return self.gpu_cost + self.node_cost


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


def pool_rows(pool: str, images: int, flagged: float, verify_fail: float = 0.0) -> float:
    """Rows a pool processes: pools with inspect, decode and write see every image, the rest only
    flagged ones; under ``stage2.verify``, attempt k's editor and checks (``edit.k``, ``verify.k``) only
    the flagged rows whose k - 1 earlier edits all failed (``verify_fail`` each)."""
    if pool in ("decode", "write") or _sees_every_row(pool_calls(pool)):
        return float(images)
    return images * flagged * verify_fail ** (verify_attempt(pool) - 1)


def _sees_every_row(calls: list[str]) -> bool:
    """Whether a stage-1 pool running ``calls`` sees every row (it holds a call that does: inspect)."""
    return any(call in CALLS and CALLS[call].every_row for call in calls)


def verify_attempt(pool: str) -> int:
    """The edit attempt a pool serves: 2 for ``edit.2`` and ``verify.2``, 1 for every other pool."""
    name, _, attempt = pool.partition(".")
    return int(attempt) if name in ("edit", "verify") and attempt.isdigit() else 1


def expected_edits(attempts: int, verify_fail: float) -> float:
    """Edits (and verifications) per flagged row when each verification fails with ``verify_fail``."""
    return sum(verify_fail**k for k in range(attempts))


def verify_tflop_per_row(cfg: JobConfig) -> tuple[float, float] | None:
    """(prefill, decode) TFLOP of one verification: call A on the edit (``reinspect``); None when only
    the CPU checks run (dlib faces)."""
    if "reinspect" not in cfg.stage2.verify.checks:
        return None
    prompt, output = CALLS["inspect"].plan_tokens
    per_call = 9 if cfg.stage1.inspect_mode == "per_criterion" else 1
    return per_call * 2 * VLM_PARAMS * prompt / 1e12, per_call * 2 * VLM_PARAMS * output / 1e12


def stage1_tflop_per_row(cfg: JobConfig, pool: str, flagged: float) -> tuple[float, float]:
    """(prefill, decode) TFLOP per row of a stage-1 pool, by 2 × parameters × tokens, summed over its calls
    (in a pool that also inspects, the later calls run on the flagged share of its rows only)."""

    def call(name: str) -> tuple[float, float]:
        prompt, output = CALLS[name].plan_tokens
        params = VLM_PARAMS if CALLS[name].vision else LLM_PARAMS
        return 2 * params * prompt / 1e12, 2 * params * output / 1e12

    s1 = cfg.stage1
    calls = pool_calls(pool)
    prefill = decode = 0.0
    for name in calls:
        share = flagged if _sees_every_row(calls) and not CALLS[name].every_row else 1.0
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


def edit_batch(cfg: JobConfig) -> int:
    """Images per editor call the estimate assumes: ``stage2.max_batch``, else the pool's batch size."""
    return getattr(cfg.stage2, "max_batch", None) or cfg.stage2.resources.batch_size


def estimate_rate(cfg: JobConfig, pool: str, card: Card, flagged: float) -> Rate | None:
    peak = card.peak_tflops
    if pool.startswith("verify"):
        tokens = verify_tflop_per_row(cfg)
        if tokens is None:
            return None
        seconds = stage1_seconds(tokens[0], tokens[1], peak)
        return Rate(1 / seconds, False, f"estimate: call A on the edit, {sum(tokens):.2f} TFLOP/row")
    if pool.startswith("edit."):  # a re-edit: its ladder rung's editor and settings
        cfg = cfg.model_copy(update={"stage2": cfg.stage2.attempt(verify_attempt(pool))})
        pool = "edit"
    if pool == "edit":
        tflop = edit_tflop_per_row(cfg)
        if tflop is None:
            return None
        batch = edit_batch(cfg)
        label = (f"estimate: {tflop:.0f} TFLOP/image at {COMPUTE_UTILISATION:.0%} of peak, "
                 f"{batch} a call (+{EDIT_CALL_IMAGES:g} images' time each)")  # fmt: skip
        return Rate(editor_call_cost(tflop, peak).rate(batch), False, label)
    if all(name in CALLS for name in pool_calls(pool)):
        prefill, decode = stage1_tflop_per_row(cfg, pool, flagged)
        seconds = stage1_seconds(prefill, decode, peak)
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


def replica_of(cfg: JobConfig, pool: str, request: Resources) -> Replica:
    """What one actor of ``pool`` holds: a vLLM engine's workers (tensor × pipeline parallelism) take
    ``num_gpus`` each, placed as `u2s.stage1.engines.vllm_pool` places them; any other actor its request."""
    from u2s.stage1.engines.vllm import world_size
    from u2s.stage1.engines.vllm_pool import actor_gpus, placement_bundles

    if pool.startswith("verify") and "reinspect" in cfg.stage2.verify.checks:  # call A: inspect's engine
        pool = next(p.name for p in cfg.stage1.pools() if "inspect" in p.calls)
    call_pool = next((p for p in cfg.stage1.pools() if p.name == pool), None)
    if call_pool is None or call_pool.engine != "vllm":
        return Replica(request.num_gpus, request)
    vllm = cfg.stage1.vllm_for(call_pool.vision)
    workers = world_size(vllm)
    placement = placement_bundles(request, vllm)
    if placement is None:  # "uni" or "mp": the actor itself holds every worker's GPUs, on its node
        gpus = actor_gpus(request, vllm)
        return Replica(gpus, request.model_copy(update={"num_gpus": gpus}), workers)
    bundles, strategy = placement
    if strategy == "STRICT_PACK":  # every bundle on one node
        cpus, gpus = sum(b.get("CPU", 0.0) for b in bundles), sum(b.get("GPU", 0.0) for b in bundles)
    else:  # bundles may land on different nodes: one node needs the largest
        big = max(bundles, key=lambda b: (b.get("GPU", 0.0), b.get("CPU", 0.0)))
        cpus, gpus = big.get("CPU", 0.0), big.get("GPU", 0.0)
    node = request.model_copy(update={"num_cpus": cpus, "num_gpus": gpus})
    return Replica(sum(b.get("GPU", 0.0) for b in bundles), node, workers, strategy)


def allocate(pools: list[PoolPlan], total: float) -> None:
    """Split ``total`` GPUs over the pools in proportion to their GPU-hours, whole replicas, one at least."""
    units = [max(p.gpus_per_replica, 1e-9) for p in pools]
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
    cluster: Cluster | None = None,
    cpu_nodes: int | None = None,
    verify_fail: float = 0.25,
    cpu_cost: CpuCost = RECORDED_CPU_COST,
) -> Plan:
    """Size every GPU pool of ``cfg`` for ``images`` images on ``card`` (``pool_cards``: other GPU types
    for some pools, e.g. the editor on L40S; ``price`` applies to ``card``). With a ``cluster``, also
    where the pools land, every node's price and what is too small (:func:`fit_cluster`; ``cpu_nodes``:
    CPU workers held, default each CPU group's maximum). ``verify_fail``: under ``stage2.verify``, the
    share of verifications assumed to fail (each sends its row to another edit). See the module
    docstring. ``cpu_cost``: CPU-seconds per row outside the models, which sizes the CPU cores the run
    needs while its GPUs work (:attr:`Plan.cpu_cores`)."""
    from u2s.pipeline import stage_pools, verify_pools

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
        overridden = price is not None and pool_card is card
        pool_price = price if overridden else pool_card.usd_per_hour
        source = f"--price ${price:,.2f}/GPU-hour" if overridden else pool_card.price_source
        rows = pool_rows(name, images, flagged, verify_fail)
        plan = PoolPlan(name, request, rows, rate, pool_card, pool_price,
                        replica=replica_of(cfg, name, request), price_source=source)  # fmt: skip
        if rate is not None:
            plan.gpu_hours = plan.rows / rate.rows_per_s / 3600
        pools.append(plan)
        path = find_path(cfg, request)
        if path and name not in verify_pools(cfg):  # those are sized in stage2.verify
            paths[name] = path
    gpu_pools = [p for p in pools if p.rate is not None]
    if gpu_pools:
        if gpus is None:  # enough for `hours`: each pool's share, rounded up to whole replicas
            gpus_needed = 0.0
            for p in gpu_pools:
                unit = p.gpus_per_replica
                gpus_needed += math.ceil(p.gpu_hours / hours / unit) * unit
            total = max(gpus_needed, sum(p.gpus_per_replica for p in gpu_pools))
        else:
            total = float(gpus)
        allocate(gpu_pools, total)
    used = sum(p.gpus for p in gpu_pools)
    wall = max((p.gpu_hours / p.gpus for p in gpu_pools), default=0.0)
    result = Plan(images, card, card.usd_per_hour if price is None else price, flagged, pools, used, wall,
                  ignored, paths, verify_fail=verify_fail, cpu_cost=cpu_cost)  # fmt: skip
    result.edit_fill = edit_fill_line(cfg, flagged)
    if cluster is not None:
        result.fit = fit_cluster(result, cluster, cpu_nodes, price)
    return result


def group_instance(group: NodeGroup) -> tuple[InstanceType | None, str]:
    """The instance type of a group's nodes from u2s/instances.py, or None and why not."""
    if not group.instance_type:
        return None, f"{group.name} names no instance type"
    try:
        return instance_type(group.instance_type), ""
    except ValueError:
        return None, f"{group.name}'s {group.instance_type} is not in u2s/instances.py"


def group_gpu(group: NodeGroup) -> str | None:
    """The GPU type of a group's nodes: its accelerator_type resource, else its instance type's GPU."""
    node, _ = group_instance(group)
    return group.accelerator_type or (node.gpu if node else None)


def nodes_for(group: NodeGroup, replica: Replica, gpus: float) -> int:
    """Nodes of ``group`` that hold ``gpus`` GPUs' worth of actors like ``replica`` (whole actors a node:
    as many as its GPUs and CPUs allow)."""
    need = replica.node
    if not need.num_gpus:
        return 0
    per_node = [math.floor(group.resources.get("GPU", 0.0) / need.num_gpus + 1e-9)]
    if need.num_cpus:
        per_node.append(math.floor(group.resources.get("CPU", 0.0) / need.num_cpus + 1e-9))
    return math.ceil(gpus / need.num_gpus / max(1, min(per_node)) - 1e-9)


def fit_cluster(
    plan: Plan, cluster: Cluster, cpu_nodes: int | None = None, price: float | None = None
) -> ClusterFit:
    """Where each pool of ``plan`` can land on ``cluster``, what its GPU nodes, the head and the CPU
    workers cost, and which group maxima (or the launcher's global ``max_workers``) are too small.

    Prices each GPU pool as the first group it fits that has its card (the pool's GPUs on whole nodes of
    that group's instance type; ``price``, --price, replaces the per-GPU price of the plan's own card).
    """
    from u2s.cluster import placement as fits

    groups = {g.name: g for g in cluster.groups}
    where = fits({p.name: p.request for p in plan.pools}, cluster.groups)
    tp_blocked: dict[str, str] = {}
    notes: list[str] = []
    for p in plan.gpu_pools:
        replica = p.replica
        assert replica is not None and p.card is not None
        on_node = fits({p.name: replica.node}, cluster.groups)[p.name]
        if where[p.name] and not on_node:
            sizes = [(n, groups[n].resources) for n in where[p.name]]
            have = ", ".join(
                f"a {n} node {r.get('GPU', 0):g} GPU and {r.get('CPU', 0):g} CPUs" for n, r in sizes
            )
            tp_blocked[p.name] = (
                f"one actor's {replica.workers} engine workers (tensor_parallel_size x "
                f"pipeline_parallel_size) need {replica.node.num_gpus:g} GPUs and {replica.node.num_cpus:g} "
                f"CPUs on one node (STRICT_PACK); {have}"
            )
        where[p.name] = on_node
        if not replica.one_node:
            notes.append(
                f"{p.name}: placement_group_config.strategy {replica.strategy}: the {replica.workers} engine "
                "workers of one actor may land on different nodes, and tensor parallelism then runs over the "
                "network (STRICT_PACK keeps them on one node)"
            )
        if not on_node:
            continue
        candidates = [groups[n] for n in on_node]
        same = [g for g in candidates if group_gpu(g) == p.card.name]
        group = (same or candidates)[0]
        if not same:
            kinds = ", ".join(f"{g.name} ({group_gpu(g) or 'GPU type unknown'})" for g in candidates)
            notes.append(
                f"{p.name} is planned on {p.card.name}, but the groups it fits are {kinds}: its rate and "
                f"price assume a card it would not get (--pool-gpu {p.name}=<type>)"
            )
        node_gpus = group.resources.get("GPU", 0.0)
        p.group, p.nodes = group.name, nodes_for(group, replica, p.gpus)
        node, why = group_instance(group)
        if price is not None and p.card is plan.card:
            p.price, p.node_price = price, price * node_gpus
            p.price_source = f"{group.name} node (--price ${price:,.2f}/GPU-hour x {node_gpus:g} GPU)"
        elif node is not None:
            p.price, p.node_price = node.usd_per_hour / node_gpus, node.usd_per_hour
            p.price_source = f"{node.name} ({group.name})"
        else:
            gpu = group_gpu(group)
            card = next((c for c in CARDS.values() if c.name == gpu), p.card)
            p.price, p.node_price = card.usd_per_hour, card.usd_per_hour * node_gpus
            p.price_source = f"{group.name} node ({why}; priced as {card.name}: {card.price_source})"
    nodes, too_small = other_nodes(cluster, cpu_nodes)
    too_small = group_shortfalls(plan, cluster, where) + too_small
    if cluster.max_workers is not None:
        gpu_nodes = sum(p.nodes for p in plan.gpu_pools)
        cpu = sum(n.count for n in nodes if n.role == "CPU workers")
        if gpu_nodes + cpu > cluster.max_workers:
            too_small.append(
                f"the launcher's max_workers allows {cluster.max_workers} worker nodes of all types "
                f"together; the run holds {gpu_nodes + cpu} ({gpu_nodes} GPU + {cpu} CPU)"
            )
    return ClusterFit(cluster, where, tp_blocked, nodes, too_small, notes)


def other_nodes(cluster: Cluster, cpu_nodes: int | None) -> tuple[list[Nodes], list[str]]:
    """The head and the CPU workers (groups without GPUs) held for the run: ``cpu_nodes`` in all, filled
    group by group up to each maximum, or else (assumed) every CPU group at its maximum."""
    held, short = [], []
    for g in cluster.groups:
        if g.head:
            node, why = group_instance(g)
            held.append(Nodes("head", g.name, 1, g.instance_type, node.usd_per_hour if node else None, why))
    cpu_groups = [g for g in cluster.groups if not g.head and not g.resources.get("GPU")]
    left = cpu_nodes
    for g in cpu_groups:
        count = g.max_workers if left is None else min(left, g.max_workers)
        if left is not None:
            left -= count
        node, why = group_instance(g)
        note = why or ("at its max_workers / maxReplicas, assumed; --cpu-nodes N to set" if cpu_nodes is None
                       else "--cpu-nodes")  # fmt: skip
        held.append(Nodes("CPU workers", g.name, count, g.instance_type, node.usd_per_hour if node else None,
                          note))  # fmt: skip
    if left:
        allow = sum(g.max_workers for g in cpu_groups)
        names = " + ".join(g.name for g in cpu_groups) or "no CPU-only group"
        short.append(f"--cpu-nodes {cpu_nodes}: the CPU groups ({names}) allow {allow} nodes")
    return held, short


def group_shortfalls(plan: Plan, cluster: Cluster, where: dict[str, list[str]]) -> list[str]:
    """Groups too small for the GPUs the plan gives the pools that can land on them.

    A pool pinned to one group (its accelerator_type) must fit that group's maximum; pools that fit
    several groups share them: for every set of groups, the pools that fit only inside it must fit its
    total (so the paper preset's pools, which fit both GPU groups, are checked against both together).
    """
    groups = {g.name: g for g in cluster.groups}
    pools = [p for p in plan.gpu_pools if where.get(p.name)]
    used = [g.name for g in cluster.groups if any(g.name in where[p.name] for p in pools)]
    sets = [c for r in range(1, len(used) + 1) for c in itertools.combinations(used, r)]
    if len(used) > 10:  # unusual: check each group and all of them together only
        sets = [(name,) for name in used] + [tuple(used)]
    short = []
    for names in sets:
        inside = [p for p in pools if set(where[p.name]) <= set(names)]
        if not inside or {n for p in inside for n in where[p.name]} != set(names):
            continue  # no pool is confined to exactly these groups
        wanted = sum(p.gpus for p in inside)
        allow = sum(groups[n].max_workers * groups[n].resources.get("GPU", 0.0) for n in names)
        if wanted <= allow + 1e-9:
            continue
        who = ", ".join(f"{p.name} {p.gpus:g}" for p in inside)
        if len(names) == 1:
            g = groups[names[0]]
            need = sum(nodes_for(g, p.replica, p.gpus) for p in inside if p.replica)
            short.append(f"{g.name} needs {need} nodes for {wanted:g} GPUs ({who}), it allows "
                         f"{g.max_workers}")  # fmt: skip
        else:
            biggest = max(groups[n].resources.get("GPU", 0.0) for n in names)
            exact = all(groups[n].resources.get("GPU", 0.0) == 1 for n in names)
            need = math.ceil(wanted / biggest - 1e-9)
            caps = " + ".join(str(groups[n].max_workers) for n in names)
            short.append(
                f"{' + '.join(names)} need {'' if exact else 'at least '}{need} nodes together for "
                f"{wanted:g} GPUs ({who}: pools that may land on any of them), they allow {caps}"
            )
    return short


def is_verify_pool(pool: str) -> bool:
    """A pool that ``stage2.verify`` adds: a check (``verify``, ``verify.k``) or a re-edit (``edit.k``)."""
    return pool.startswith("verify") or verify_attempt(pool) > 1


def verify_lines(plan: Plan) -> list[str]:
    """What ``stage2.verify`` costs per flagged row (empty when it is off)."""
    pools = [p for p in plan.pools if is_verify_pool(p.name)]
    if not pools:
        return []
    attempts = max(verify_attempt(p.name) for p in pools)
    flagged = max(plan.images * plan.flagged, 1e-9)
    seconds = 3600 * sum(p.gpu_hours for p in pools) / flagged
    return [
        f"stage2.verify: every edit is checked before it is published, up to {attempts} edits per flagged "
        f"row; with {plan.verify_fail:.0%} of checks failing (assumed; --verify-fail) that is "
        f"{expected_edits(attempts, plan.verify_fail):.2f} edits and checks per flagged row, and the verify "
        f"and re-edit pools add {seconds:.2f} GPU-s per flagged row"
    ]


def cpu_lines(plan: Plan) -> list[str]:
    """The CPU cores the run's non-model work needs, per GPU, and (with a cluster) the CPU nodes that
    hold them (each CPU group's CPUs; the GPU nodes' own CPUs not counted)."""
    cores, cost = plan.cpu_cores, plan.cpu_cost
    if not cores:
        return []
    per_gpu = cores / plan.gpus if plan.gpus else 0.0
    lines = [f"CPU work outside the models: {cost.seconds_per_row * 1e3:.1f} ms/row ({cost.source}; "
             f"--cpu-cost) -> {cores:,.2f} cores while the GPUs run, {per_gpu:.2f} per GPU"]  # fmt: skip
    if plan.fit is not None:
        for g in plan.fit.cluster.groups:
            cpus = g.resources.get("CPU", 0.0)
            if not g.head and not g.resources.get("GPU") and cpus:
                lines.append(f"  = {math.ceil(cores / cpus - 1e-9)} x {g.name} ({cpus:g} CPUs) if that work "
                             "runs on CPU workers only")  # fmt: skip
    return lines


def edit_fill_line(cfg: JobConfig, flagged: float) -> str:
    """How full the edit pool's editor calls are expected to be at the flag rate ``flagged``: Ray batches
    of ``stage2.resources.batch_size`` rows, calls of ``stage2.max_batch`` images of one working size (a
    fixed-resolution editor's two equally common sizes assumed: landscape and portrait), and the Ray batch
    that fills them to 90%. Empty for a native-size editor (its calls hold one native size each)."""
    from u2s.stage2.runner import mean_call_size, rows_for_fill

    s2 = cfg.stage2
    if not hasattr(s2.section(), "resolution") or not 0 < flagged <= 1:
        return ""
    rows, cap = s2.resources.batch_size, s2.max_batch or s2.resources.batch_size
    fill = mean_call_size(rows, flagged, cap, (0.5, 0.5)) / cap
    line = (f"editor calls: {fill:.0%} full ({cap} images at most, stage2.max_batch) with Ray batches of "
            f"{rows} rows (stage2.resources.batch_size) at {flagged:.0%} flagged, two working sizes "
            "assumed")  # fmt: skip
    if fill < 0.9:
        line += f"; batch_size {rows_for_fill(flagged, cap, (0.5, 0.5))} for 90%"
    return line


def format_plan(plan: Plan) -> str:
    """The plan as a table, totals and cost, and the pool sizes to put in the config; with a cluster,
    which groups each pool fits and what is too small."""
    fit = plan.fit
    lines = [
        f"u2s plan: {plan.images:,} images on {plan.card.name}, {plan.flagged:.0%} of them flagged "
        "(assumed; --flagged)",
        "throughputs marked 'estimate' are FLOP counts at an assumed share of peak, not measurements; "
        "GPU-hours, wall time and cost follow from them",
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
    lines += verify_lines(plan)
    lines += cpu_lines(plan)
    lines += [plan.edit_fill] if plan.edit_fill else []
    what = "every node" if fit else "GPUs only"
    lines += [
        "",
        f"total: {plan.gpu_hours:,.1f} GPU-hours; {plan.gpus:g} GPUs -> {plan.wall_hours:,.1f} h wall; "
        f"cost ~${plan.cost:,.0f} ({what}, held for the whole run)",
        "",
        f"cost over {plan.wall_hours:,.1f} h:",
    ]

    def row(label: str, usd: float | None, detail: str) -> str:
        return f"  {label:<24}{'-' if usd is None else '$' + format(usd, ',.0f'):>9}  {detail}"

    def gpus(n: float) -> str:
        return f"{n:g} GPU" + ("" if n == 1 else "s")

    if fit is None:
        for p in plan.gpu_pools:
            assert p.card is not None
            detail = f"{p.gpus:g} x {p.card.name} at ${p.price:,.3f}/GPU-hour: {p.price_source}"
            lines.append(row(p.name, plan.wall_hours * p.usd_per_hour, detail))
        lines.append(row("GPUs", plan.gpu_cost, "head, CPU workers, disks and S3 not counted (--cluster "
                         "prices every node)"))  # fmt: skip
    else:
        for p in plan.gpu_pools:
            usd = plan.wall_hours * p.usd_per_hour
            if p.group:
                detail = f"{p.nodes} x {p.price_source} at ${p.node_price:,.3f}/h ({gpus(p.gpus)})"
            else:
                detail = f"{gpus(p.gpus)} at ${p.price:,.3f}/GPU-hour (no group fits; {p.price_source})"
            lines.append(row(p.name, usd, detail))
        lines.append(row("GPU nodes", plan.gpu_cost, "every GPU pool's nodes"))
        for n in fit.nodes:
            usd = None if n.usd_per_hour is None else plan.wall_hours * n.count * n.usd_per_hour
            priced = (
                f"{n.instance} at ${n.usd_per_hour:,.3f}/h" if n.usd_per_hour is not None else "not priced"
            )
            label = n.role if n.role == n.group else f"{n.role} ({n.group})"
            lines.append(row(label, usd, f"{n.count} x {priced}" + (f"; {n.note}" if n.note else "")))
        unpriced = [n.group for n in fit.nodes if n.usd_per_hour is None]
        lines.append(row("head + CPU nodes", plan.node_cost, "held for the whole run too"
                         + (f" (not priced: {', '.join(unpriced)})" if unpriced else "")))  # fmt: skip
        lines.append(row("total", plan.cost, "EBS volumes, S3 requests and transfer, start-up and idle time "
                         "not counted"))  # fmt: skip
    lines.append(f"  prices: {PRICES}; --price for yours")
    if plan.ignored:
        lines += ["measurements not used:", *(f"  {reason}" for reason in plan.ignored)]
    lines += ["", "pool sizes for the config (autoscaling pools: [min, max] actors):"]
    for p in plan.gpu_pools:
        where = plan.paths.get(p.name, p.name)
        assert p.replica is not None
        if is_verify_pool(p.name):
            lines.append(f"  # {p.name}: [1,{p.replicas}] in stage2.verify.resources (checks) or the ladder "
                         "rung's resources (re-edits)")  # fmt: skip
            continue
        per = f"{p.gpus_per_replica:g} GPU{'' if p.gpus_per_replica == 1 else 's'} per actor"
        if p.replica.workers > 1:
            per += f", {p.replica.workers} engine workers on one node"
        lines.append(f"  --set '{where}.pool_size=[1,{p.replicas}]'   # {per}")
    if fit is not None:
        lines += ["", "worker groups each pool fits (a node holds one actor or more):"]
        for name, names in fit.placement.items():
            why = fit.tp_blocked.get(name, "no group can run it")
            lines.append(f"  {name:<17}{', '.join(names) if names else 'NONE: ' + why}")
        loose = [p.name for p in plan.gpu_pools if len(fit.placement.get(p.name, [])) > 1]
        if loose:
            lines.append(
                f"  ({', '.join(loose)}: no accelerator_type, so any of those groups, whose cards may differ "
                "from the plan's; set <pool>.accelerator_type to pin a pool to its group)"
            )
        lines += [f"  note: {line}" for line in fit.notes]
        lines += [f"  too small: {line}" for line in fit.too_small]
        if fit.too_small:
            lines.append("  (raise the groups' max_workers / maxReplicas and the cloud's GPU quota, or plan "
                         "fewer GPUs: --gpus, --hours)")  # fmt: skip
    return "\n".join(lines)


#: Training FLOP per sample over one denoiser forward pass: a full fine-tune's backward pass costs about
#: twice its forward (activation and weight gradients), so ≈ 3×; a LoRA computes no weight gradients for
#: the frozen layers, so ≈ 2×. VAE and text encoders excluded (``precompute: true`` runs them once).
TRAIN_FLOP_FACTOR = {"full": 3.0, "lora": 2.0}
#: Training side per fine-tunable editor (PAPER.md §3.3: 256 px for the IP2P family; §3.4: 512 px LoRA).
TRAIN_RESOLUTION = {"safe_attention": 256, "instruct_pix2pix": 256, "flux_kontext": 512}


@dataclass
class FinetunePlan:
    """GPU-hours, GPUs and cost of one ``u2s finetune`` job, from FLOP per sample at an assumed MFU."""

    editor: str
    method: str
    pairs: int
    epochs: float
    resolution: int
    card: Card
    mfu: float
    gpus: int
    price: float

    @property
    def samples(self) -> float:
        return self.pairs * self.epochs

    @property
    def tflop_per_sample(self) -> float:
        """Denoiser forward TFLOP at ``resolution`` (the 512² count scaled by pixels) × training factor."""
        forward = DENOISER_TFLOP_PER_STEP[self.editor] * (self.resolution / 512) ** 2
        return forward * TRAIN_FLOP_FACTOR[self.method]

    @property
    def gpu_hours(self) -> float:
        return self.samples * self.tflop_per_sample / (self.card.peak_tflops * self.mfu) / 3600

    @property
    def wall_hours(self) -> float:
        return self.gpu_hours / self.gpus

    @property
    def cost(self) -> float:
        return self.gpus * self.wall_hours * self.price


def make_finetune_plan(
    editor: str,
    pairs: int,
    card: Card,
    epochs: float = 200,
    method: str = "full",
    resolution: int | None = None,
    mfu: float = COMPUTE_UTILISATION,
    gpus: int | None = None,
    hours: float = 24.0,
    price: float | None = None,
) -> FinetunePlan:
    """Size a fine-tuning job: ``gpus`` given, or the fewest that finish within ``hours``."""
    if editor not in TRAIN_RESOLUTION:
        raise ValueError(f"editor {editor!r} cannot be fine-tuned; one of {', '.join(TRAIN_RESOLUTION)}")
    if method not in TRAIN_FLOP_FACTOR:
        raise ValueError(f"method {method!r}: one of {', '.join(TRAIN_FLOP_FACTOR)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu {mfu} must be in (0, 1]")
    plan = FinetunePlan(editor, method, pairs, epochs, resolution or TRAIN_RESOLUTION[editor], card, mfu,
                        gpus or 1, card.usd_per_hour if price is None else price)  # fmt: skip
    if gpus is None:
        plan.gpus = max(1, math.ceil(plan.gpu_hours / hours))
    return plan


def format_finetune_plan(plan: FinetunePlan) -> str:
    """The fine-tuning plan: work, FLOP per sample, GPU-hours, GPUs, wall time and cost."""
    card, factor = plan.card, TRAIN_FLOP_FACTOR[plan.method]
    gpus = f"{plan.gpus} GPU" + ("" if plan.gpus == 1 else "s")
    return "\n".join([
        f"u2s plan --finetune: {plan.editor} ({plan.method}) on {plan.pairs:,} pairs x {plan.epochs:g} "
        f"epochs = {plan.samples:,.0f} samples at {plan.resolution} px, {card.name}",
        f"per sample: {plan.tflop_per_sample:.3g} TFLOP (denoiser forward x {factor:g}: forward + backward; "
        "VAE and text encoders not counted)",
        f"estimate at {plan.mfu:.0%} MFU of {card.peak_tflops:g} TFLOP/s peak (--mfu; bench/train.py --gpu "
        "measures yours)",
        "",
        f"total: {plan.gpu_hours:,.1f} GPU-hours; {gpus} (data-parallel, linear scaling assumed) -> "
        f"{plan.wall_hours:,.1f} h wall; cost ~${plan.cost:,.0f} (GPUs only, ${plan.price:,.3f}/GPU-hour)",
        f"finetune config: num_workers: {plan.gpus}, use_gpu: true, resolution: {plan.resolution}, "
        f"method: {plan.method}",
    ])  # fmt: skip
