"""TransformersEngine on the tiny random VLM and LLM, loaded from disk: constrained JSON, batching, seeds."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from PIL import Image

from u2s.config import GenerationConfig, ModelConfig
from u2s.stage1.engines import generate_validated
from u2s.stage1.engines.transformers import TransformersEngine, fit_image
from u2s.stage1.prompts import describe_messages, inspect_messages, instruct_messages
from u2s.stage1.schemas import InspectResult, InstructResult, OutputError, json_schema

CAPTIONS = [
    "A dog on a sofa.",
    "A person walking on a beach, small, at the left edge of the frame, with trees behind.",
    "Two bicycles leaning on a wall.",
]


def _images() -> list[Image.Image]:
    rs = np.random.RandomState(0)
    noise = Image.fromarray((rs.rand(40, 90, 3) * 255).astype("uint8"))
    gradient = Image.fromarray(np.tile(np.linspace(0, 255, 120, dtype=np.uint8), (200, 1))).convert("RGB")
    return [noise, gradient, Image.new("RGB", (30, 30), (250, 250, 250))]


@pytest.fixture(scope="module")
def vlm(tiny_models) -> TransformersEngine:
    import torch

    torch.set_num_threads(1)
    model = ModelConfig(model=str(tiny_models["vlm"]), dtype="float32", device="cpu")
    return TransformersEngine(model, vision=True, image_size=56)


@pytest.fixture(scope="module")
def llm(tiny_models) -> TransformersEngine:
    model = ModelConfig(model=str(tiny_models["llm"]), dtype="float32", device="cpu")
    return TransformersEngine(model, vision=False)


def test_fit_image_keeps_aspect_and_never_upscales():
    assert fit_image(Image.new("RGB", (200, 100)), 56).size == (56, 28)
    assert fit_image(Image.new("RGB", (100, 300)), 56).size == (19, 56)
    small = Image.new("RGB", (20, 10))
    assert fit_image(small, 56) is small


def test_vlm_batch_is_schema_valid_and_deterministic(vlm):
    schema = json_schema(InspectResult)
    conversations = [inspect_messages(), describe_messages("dog"), inspect_messages()]
    first = vlm.generate(conversations, _images(), schema, max_new_tokens=256)
    second = vlm.generate(conversations, _images(), schema, max_new_tokens=256)
    assert len(first) == 3
    assert first == second
    for text in first:
        jsonschema.validate(json.loads(text, strict=False), schema)


def test_vlm_left_padded_batch_matches_single_rows(vlm):
    schema = json_schema(InspectResult)
    conversations = [inspect_messages(), describe_messages("a very long class name " * 4), inspect_messages()]
    batch = vlm.generate(conversations, _images(), schema, max_new_tokens=256)
    singles = [
        vlm.generate([c], [img], schema, max_new_tokens=256)[0]
        for c, img in zip(conversations, _images(), strict=True)
    ]
    assert batch == singles


def test_vlm_needs_one_image_per_conversation(vlm):
    with pytest.raises(ValueError, match="one image per conversation"):
        vlm.generate([inspect_messages()] * 2, _images()[:1], json_schema(InspectResult), max_new_tokens=8)


def test_llm_batch_is_schema_valid_deterministic_and_padding_safe(llm):
    schema = json_schema(InstructResult)
    conversations = [instruct_messages(c) for c in CAPTIONS]
    first = llm.generate(conversations, None, schema, max_new_tokens=1024)
    assert first == llm.generate(conversations, None, schema, max_new_tokens=1024)
    for text in first:
        jsonschema.validate(json.loads(text, strict=False), schema)
    # Each row has its own grammar matcher and left padding leaves its prompt intact.
    assert first == [llm.generate([c], None, schema, max_new_tokens=1024)[0] for c in conversations]


def test_sampling_is_seeded_per_row(llm):
    schema = json_schema(InstructResult)
    conversations = [instruct_messages(c) for c in CAPTIONS[:3]]
    a = llm.generate(conversations, None, schema, 1024, temperature=0.9, seeds=[1, 2, 3])
    assert a == llm.generate(conversations, None, schema, 1024, temperature=0.9, seeds=[1, 2, 3])
    assert a != llm.generate(conversations, None, schema, 1024, temperature=0.9, seeds=[4, 5, 6])
    assert a != llm.generate(conversations, None, schema, 1024)
    for text in a:
        jsonschema.validate(json.loads(text, strict=False), schema)
    # A row's sample depends on its own seed, not on the rows that share its batch or their order.
    assert llm.generate(conversations[1:2], None, schema, 1024, temperature=0.9, seeds=[2]) == a[1:2]
    swapped = llm.generate(conversations[2::-2], None, schema, 1024, temperature=0.9, seeds=[3, 1])
    assert swapped == [a[2], a[0]]
    with pytest.raises(ValueError, match="2 seeds for 3 conversations"):
        llm.generate(conversations, None, schema, 1024, temperature=0.9, seeds=[1, 2])


def test_row_seeded_sampling_draws_from_the_tempered_softmax():
    """The Gumbel-max sampler's token frequencies over many seeds match softmax(logits / T); masked
    tokens never come up."""
    import torch

    from u2s.stage1.engines.transformers import RowSeededSampling

    logits = torch.tensor([2.0, 1.0, 0.0, -float("inf"), 0.5])
    temperature, draws = 0.7, 4000
    sampler = RowSeededSampling(tuple(range(draws)), temperature, "cpu")
    picks = sampler(None, logits.expand(draws, -1).clone()).argmax(dim=-1)
    frequencies = torch.bincount(picks, minlength=5).double() / draws
    expected = torch.softmax(logits.double() / temperature, dim=0)
    assert frequencies[3] == 0
    # Binomial standard error ≤ 0.008 at 4000 draws: 0.035 is more than four of them.
    assert torch.allclose(frequencies, expected, atol=0.035), (frequencies, expected)


def test_grammar_never_allows_special_tokens_inside_strings(llm):
    import xgrammar as xgr

    tok = llm.tokenizer
    matcher = xgr.GrammarMatcher(llm._grammar(json_schema(InstructResult)))
    for token in tok.encode('{"edit_instruction":"a', add_special_tokens=False):
        assert matcher.accept_token(token)
    vocab_size = llm.model.config.get_text_config().vocab_size
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    words = bitmask[0].numpy().astype(np.uint32)

    def allowed(token_id: int) -> bool:
        return bool((int(words[token_id // 32]) >> (token_id % 32)) & 1)

    assert allowed(tok.encode("b", add_special_tokens=False)[0])
    specials = set(tok.all_special_ids) - set(llm.stop_ids)
    assert specials and not any(allowed(i) for i in specials)


def test_generate_validated_retries_then_reports_content_free(llm):
    conversations = [instruct_messages(c) for c in CAPTIONS[:2]]
    ok = generate_validated(
        llm, conversations, None, InstructResult, GenerationConfig(max_new_tokens=1024), seeds=[3, 4]
    )
    assert all(isinstance(r, InstructResult) for r in ok)
    short = GenerationConfig(max_new_tokens=6, retry_temperature=0.8)
    failed = generate_validated(llm, conversations, None, InstructResult, short, seeds=[3, 4])
    assert all(isinstance(r, OutputError) for r in failed)
    for error in failed:
        assert str(error).startswith("invalid output after retry: incomplete JSON")
        assert '"' not in str(error)
