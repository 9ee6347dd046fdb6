"""Local engine: Hugging Face transformers `generate`, JSON constrained by xgrammar (CPU tests, demo).

Batches are left-padded; each row gets its own grammar matcher (xgrammar's HF logits processor builds
one `GrammarMatcher` per batch row). Special tokens are removed from the grammar's vocabulary, so a
constrained string can never contain a token (``<image>``, ``<|im_start|>``...) that decoding with
``skip_special_tokens`` would silently drop.

Prompts are rendered with each model's own chat template (the processor's for VLMs, the tokenizer's
for LLMs). Some families' templates reject a system role (they raise "roles must alternate"); with
``system_prompt="auto"`` the engine then merges the system text into the first user turn, once per
engine, and keeps doing so.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from u2s.log_privacy import silence_input_echo
from u2s.stage1.engines.base import Decoding, Engine
from u2s.stage1.engines.messages import (
    SystemPrompt,
    fit_image,
    has_system,
    merge_system_into_user,
    text_only,
    with_parts,
)
from u2s.torch_utils import resolve_device, resolve_dtype

if TYPE_CHECKING:
    from PIL import Image

    from u2s.config import ModelConfig, StorageConfig

logger = logging.getLogger(__name__)

#: Compact JSON separators: fewer tokens, and no whitespace choices for the model to loop on.
SEPARATORS = (",", ":")


def _as_list(ids: Any) -> list[int]:
    if ids is None:
        return []
    return [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]


class RowSeededSampling:
    """Temperature sampling with a generator per batch row, as a logits processor for greedy ``generate``.

    ``generate`` samples a whole batch from one global generator, so a row's draw would depend on its
    batch-mates (and transformers has no per-row generators). The Gumbel-max trick samples the same
    distribution row by row: argmax(logits / T - log E), E ~ Exp(1) drawn from the row's own generator,
    equals a draw from softmax(logits / T). Tokens the grammar masked (-inf) stay impossible.
    """

    def __init__(self, seeds: tuple[int, ...], temperature: float, device: str) -> None:
        import torch

        self.temperature = temperature
        self.generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows for {len(self.generators)} seeds")
        races = [
            torch.empty(scores.shape[-1], device=scores.device).exponential_(generator=g)
            for g in self.generators
        ]
        return scores.float() / self.temperature - torch.stack(races).log()


class TransformersEngine(Engine):
    """A transformers chat model (vision: processor + image-text-to-text; text: tokenizer + causal LM).

    ``system_prompt`` as in :class:`~u2s.stage1.engines.base.Engine` ("auto": merged after the chat
    template rejected a system role). ``processor_kwargs`` go to every VLM processor call
    (e.g. ``{"crop_to_patches": False}``: InternVL's single 448 px tile, the paper's setting).
    An s3:// model is staged into the local model cache first (``storage``: endpoint and cache), and
    model, tokenizer and processor load from that folder.
    """

    def __init__(
        self,
        model: ModelConfig,
        vision: bool,
        image_size: int = 448,
        system_prompt: SystemPrompt = "auto",
        processor_kwargs: dict[str, Any] | None = None,
        storage: StorageConfig | None = None,
    ) -> None:
        import transformers
        import xgrammar as xgr

        from u2s.io.model_store import local_model

        silence_input_echo()
        super().__init__(vision, image_size, system_prompt)
        self.processor_kwargs = dict(processor_kwargs or {})
        self.device = resolve_device(model.device)
        name, model = model.model, local_model(model, storage)
        load: dict[str, Any] = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
        if vision:
            self.processor = transformers.AutoProcessor.from_pretrained(model.model, **load)
            self.tokenizer = self.processor.tokenizer
            model_cls = transformers.AutoModelForImageTextToText
        else:
            self.processor = None
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model.model, **load)
            model_cls = transformers.AutoModelForCausalLM
        dtype = resolve_dtype(model.dtype, self.device)
        self.model = model_cls.from_pretrained(model.model, dtype=dtype, **load)
        self.model.to(self.device).eval()

        self.tokenizer.padding_side = "left"
        gen = self.model.generation_config
        self.stop_ids = _as_list(gen.eos_token_id) or _as_list(self.tokenizer.eos_token_id)
        if not self.stop_ids:
            raise ValueError(f"{name}: no eos token id in its generation config or tokenizer")
        pad = gen.pad_token_id if gen.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.stop_ids[0]
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token_id = self.pad_id

        vocab_size = self.model.config.get_text_config().vocab_size
        stops = self.stop_ids
        info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
        special = set(self.tokenizer.all_special_ids)
        special |= {i for i, tok in self.tokenizer.added_tokens_decoder.items() if tok.special}
        # Empty strings mark tokens the grammar never emits; stop tokens stay known via stop_token_ids.
        vocab = [b"" if i in special else piece for i, piece in enumerate(info.decoded_vocab)]
        info = xgr.TokenizerInfo(
            vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stops,
            add_prefix_space=info.add_prefix_space,
        )  # fmt: skip
        self._compiler = xgr.GrammarCompiler(info)
        self._grammars: dict[str, Any] = {}

    def _grammar(self, schema: dict) -> Any:
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            self._grammars[key] = self._compiler.compile_json_schema(
                json.dumps(schema), any_whitespace=False, separators=SEPARATORS
            )
        return self._grammars[key]

    def _render_one(self, conversation: list[dict]) -> str:
        if self.vision:
            return self.processor.apply_chat_template(
                with_parts(conversation), add_generation_prompt=True, tokenize=False
            )
        return self.tokenizer.apply_chat_template(
            text_only(conversation), add_generation_prompt=True, tokenize=False
        )

    def render(self, conversation: list[dict]) -> str:
        """The prompt text of one conversation, through the model's chat template (system policy applied)."""
        from jinja2 import TemplateError

        system = has_system(conversation)
        if self._merge_system and system:
            return self._render_one(merge_system_into_user(conversation))
        try:
            return self._render_one(conversation)
        except TemplateError:
            if not system or self.system_prompt != "auto":
                raise
        # Only the fact is logged: template messages can quote the conversation.
        logger.info("chat template rejects a system role: merging system prompts into the user turn")
        self._merge_system = True
        return self._render_one(merge_system_into_user(conversation))

    def _inputs(self, conversations: list[list[dict]], images: list[Image.Image] | None) -> Any:
        prompts = [self.render(c) for c in conversations]
        if self.vision:
            fitted = [fit_image(img, self.image_size) for img in images]
            inputs = self.processor(
                text=prompts, images=fitted, return_tensors="pt", padding=True, add_special_tokens=False,
                **self.processor_kwargs,
            )  # fmt: skip
        else:
            inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _generate(
        self, conversations: list[list[dict]], images: list[Image.Image] | None, decoding: Decoding
    ) -> list[str]:
        import torch
        from xgrammar.contrib.hf import LogitsProcessor

        inputs = self._inputs(conversations, images)
        kwargs: dict[str, Any] = {
            "max_new_tokens": decoding.max_new_tokens,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.pad_id,
            # A processor holds per-row matchers and is single-use: a fresh one per call.
            "logits_processor": [LogitsProcessor(self._grammar(decoding.schema))],
        }
        if decoding.temperature > 0 and decoding.seeds is None:
            kwargs.update(do_sample=True, temperature=decoding.temperature, top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
            if decoding.temperature > 0:  # sampled, one generator per row: after the grammar's mask
                sampler = RowSeededSampling(decoding.seeds, decoding.temperature, self.device)
                kwargs["logits_processor"].append(sampler)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
