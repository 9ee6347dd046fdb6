"""Timed stand-ins for the model calls, for the simulated GPU cluster (``bench/cluster_sim.py``).

They hold their actor for the time a real GPU would need and answer like the real models, and they are
plugged in through the same registries as any user engine or editor
(:func:`u2s.stage1.engines.register_engine`, :func:`u2s.stage2.editors.register_editor`): nothing in the
``u2s`` package names them, so a config that asks for them is refused unless :func:`install` ran.

* :class:`StandinEngine` (engine ``standin``, a vLLM-style pool: ``stage1.vllm``'s batches in flight) runs
  one :class:`SlotEngine` per actor: continuous batching by steps of ``step_s``, up to ``max_num_seqs``
  requests a step; a request of ``w`` GPU-seconds at full occupancy needs ``w · max_num_seqs / step_s``
  steps (:class:`u2s.costs.ContinuousBatching`), so an engine that is not full wastes its slots, as a
  memory-bound decoding step does. Answers are schema-valid records of the call's real result model
  (:mod:`u2s.stage1.schemas`); an image is flagged when a hash of its thumbnail's pixels falls under the
  flag rate (the same image is flagged on every run).
* :class:`StandinEditor` (editor ``standin``): a call of ``n`` images sleeps ``a + b·n`` (the editor's
  :class:`u2s.costs.CallCost`) and returns each image with a grey box drawn over it.

Settings come from the environment (``U2S_STANDINS``: JSON written by the bench before Ray starts, so every
worker inherits it): per-call GPU-seconds, the editor's ``a``/``b``, ``step_s``, the flag rate and the
folder where each actor appends its timing records (``<kind>-<pid>-<n>.jsonl``; the bench reads them).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from u2s.costs import CallCost, ContinuousBatching
from u2s.stage1.engines import Engine, register_engine
from u2s.stage1.engines.base import Decoding
from u2s.stage1.schemas import (
    CombineResult,
    CriterionResult,
    DescribeResult,
    FusedResult,
    InspectResult,
    InstructResult,
    json_schema,
)
from u2s.stage2.editors import Editor, EditorConfig, register_editor
from u2s.stage2.editors.base import fit_long_side

if TYPE_CHECKING:
    from PIL import Image

    from u2s.stage2.editors.base import EditPrompt

ENV = "U2S_STANDINS"
NAME = "standin"
_serial = itertools.count()


def settings() -> dict[str, Any]:
    """The bench's settings of this run (see the module docstring)."""
    return json.loads(os.environ[ENV])


class Recorder:
    """Appends one JSON line per event to this actor's own file; a heartbeat line every ``beat_s``."""

    def __init__(self, kind: str, meta: dict[str, Any], beat_s: float = 0.5) -> None:
        folder = Path(settings()["records"])
        self._file = open(folder / f"{kind}-{os.getpid()}-{next(_serial)}.jsonl", "a", buffering=1)  # noqa: SIM115
        self._lock = threading.Lock()
        self.write({"event": "start", **meta})
        threading.Thread(target=self._beat, args=(beat_s,), daemon=True).start()

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._file.write(json.dumps({"t": time.time(), **record}) + "\n")

    def _beat(self, beat_s: float) -> None:
        while True:
            time.sleep(beat_s)
            self.write({"event": "alive"})


def flagged(image: Image.Image | None, rate: float) -> bool:
    """Whether the stand-in flags this image: a hash of its pixels, as a fraction of 2**64, < ``rate``."""
    if image is None:
        return False
    digest = hashlib.blake2b(image.tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate


class SlotEngine:
    """One engine's continuous batching: a thread runs steps of ``step_s`` seconds over the requests in
    flight (up to ``max_num_seqs``); each request leaves after its number of steps."""

    def __init__(self, timing: ContinuousBatching, recorder: Recorder) -> None:
        self.timing = timing
        self.recorder = recorder
        self._pending: deque[list] = deque()  # [steps left, event]
        self._wake = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def run(self, seconds_at_full: float, n: int) -> None:
        """Put ``n`` requests of ``seconds_at_full`` GPU-seconds each in flight; return once all are done."""
        steps = self.timing.steps(seconds_at_full)
        events = [threading.Event() for _ in range(n)]
        with self._wake:
            self._pending.extend([steps, e] for e in events)
            self._wake.notify()
        for e in events:
            e.wait()

    def _run(self) -> None:
        active: list[list] = []
        limit = self.timing.max_num_seqs
        while True:
            with self._wake:
                while not active and not self._pending:
                    self._wake.wait()
                while self._pending and len(active) < limit:
                    active.append(self._pending.popleft())
            start = time.time()
            time.sleep(self.timing.step_s)
            self.recorder.write({"event": "step", "start": start, "n": len(active)})
            for request in active:
                request[0] -= 1
                if request[0] <= 0:
                    request[1].set()
            active = [r for r in active if r[0] > 0]


#: Result model of each call, by the JSON schema the call constrains its output to.
_CALLS = {
    "inspect": InspectResult,
    "describe": DescribeResult,
    "instruct": InstructResult,
    "combine": CombineResult,
    "criterion": CriterionResult,
    "fused": FusedResult,
}


def _answer(call: str, flag: bool) -> str:
    """A valid answer of ``call`` (a flagged one when ``flag``), as the model's JSON text."""
    review = [{"item": "a face", "reason": "it identifies a person", "category": "people"}]
    captions = {"private_caption": "a person in a room", "public_caption": "a room"}
    records = {
        "inspect": {"privacy_flag": flag, "categories": ["people"] if flag else []},
        "describe": {"review": review, **captions},
        "instruct": {"edit_instruction": "hide the face"},
        "combine": {"combined_caption": "a room with a hidden face"},
        "criterion": {"present": flag},
        "fused": (
            {"privacy_flag": True, "categories": ["people"], "review": review, **captions}
            if flag
            else {"privacy_flag": False}
        ),
    }
    return json.dumps(records[call])


class StandinEngine(Engine):
    """A stage-1 engine that holds its actor for the GPU time of each request (see the module docstring)."""

    def __init__(self, stage1: Any, model: Any, vision: bool, storage: Any = None) -> None:
        super().__init__(vision, stage1.image_size, stage1.system_prompt)
        config = settings()
        self.seconds: dict[str, float] = config["engine_seconds"]
        self.rate: float = config["flag_rate"]
        slots = stage1.vllm_for(vision).max_num_seqs or 64
        self.recorder = Recorder("engine", {"vision": vision, "max_num_seqs": slots})
        self.engine = SlotEngine(ContinuousBatching(config["step_s"], slots), self.recorder)
        self._schemas = {json.dumps(json_schema(cls), sort_keys=True): call for call, cls in _CALLS.items()}

    def _generate(
        self, conversations: list[list[dict]], images: list[Image.Image] | None, decoding: Decoding
    ) -> list[str]:
        call = self._schemas[json.dumps(decoding.schema, sort_keys=True)]
        start = time.time()
        self.engine.run(self.seconds.get(call, self.seconds["inspect"]), len(conversations))
        self.recorder.write({"event": "call", "call": call, "start": start, "n": len(conversations)})
        flags = (
            [flagged(img, self.rate) for img in images] if images is not None else [True] * len(conversations)
        )
        return [_answer(call, flag) for flag in flags]


class StandinEditorConfig(EditorConfig):
    """The stand-in editor's working size: InstructPix2Pix's (long side ``resolution``, sides multiples of
    64), so the runner groups images into calls as it would for that editor. Its timing comes from the
    bench."""

    resolution: int = Field(512, ge=64, description="Long side of the working size.")


class StandinEditor(Editor):
    """An editor that holds its actor ``a + b·n`` seconds per call of ``n`` images."""

    name: ClassVar[str] = NAME
    config_class: ClassVar[type[EditorConfig]] = StandinEditorConfig

    def __init__(self, stage2: Any, storage: Any = None) -> None:
        super().__init__(stage2, storage)
        config = settings()
        self.cost = CallCost(config["editor_a"], config["editor_b"])
        self.max_batch = getattr(stage2, "max_batch", None) or stage2.resources.batch_size
        self.recorder = Recorder("editor", {"max_batch": self.max_batch})

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        return fit_long_side(width, height, self.config.resolution)

    def _edit(
        self, images: list[Image.Image], prompts: list[EditPrompt], seeds: list[int]
    ) -> list[Image.Image]:
        from PIL import ImageDraw

        start = time.time()
        time.sleep(self.cost.seconds(len(images)))
        self.recorder.write({"event": "call", "start": start, "n": len(images)})
        outputs = []
        for img in images:
            out = img.copy()
            w, h = out.size
            ImageDraw.Draw(out).rectangle((w // 4, h // 4, w // 2, h // 2), fill=(128, 128, 128))
            outputs.append(out)
        return outputs


def install() -> None:
    """Register the stand-ins in this process (the bench's driver, and every Ray worker through
    ``worker_process_setup_hook``)."""
    register_engine(NAME, StandinEngine, vllm_pool=True)
    register_editor(StandinEditor)
