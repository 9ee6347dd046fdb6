"""Stage-1 actor pools: one engine per actor, the pool's calls run on each batch in order.

:meth:`u2s.config.Stage1Config.pools` groups consecutive calls that share a model and engine (by
default inspect + describe on the VLM, instruct + combine on the LLM), so each model loads once per
actor and a flagged row goes from call A to call B without leaving the actor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from u2s.stage import StageChain

if TYPE_CHECKING:
    from u2s.config import CallPool, Stage1Config, StorageConfig
    from u2s.stage1.call import ModelCallStage


def call_stage_class(stage1: Stage1Config, call: str) -> type[ModelCallStage]:
    """The stage class that runs ``call`` under ``stage1`` (inspect is the fused call in fused mode)."""
    from u2s.stage1.call import stage_class

    return stage_class(call, stage1.mode)


class CallPoolStage(StageChain):
    """The actor of one stage-1 pool: loads the pool's model once and runs its calls on every batch.

    The last pool that reads thumbnails drops them: later hops carry only the bytes they need.
    ``storage``: endpoint and model cache of an s3:// model (staged here, on the worker).
    """

    def __init__(self, stage1: Stage1Config, pool: CallPool, storage: StorageConfig | None = None) -> None:
        from u2s.stage1.engines import build_engine
        from u2s.torch_utils import set_threads

        set_threads(pool.resources.threads())
        classes = [call_stage_class(stage1, call) for call in pool.calls]
        model = stage1.vlm if pool.vision else stage1.llm
        engine = build_engine(stage1, pool.engine, model, pool.vision, storage)
        super().__init__([cls(stage1, engine) for cls in classes])
        vision_pools = [p.name for p in stage1.pools() if p.vision]
        self.drops_thumbnails = bool(vision_pools) and vision_pools[-1] == pool.name

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = super().__call__(batch)
        if self.drops_thumbnails:
            for name in ("thumbnail", "frame_thumbnails"):
                index = batch.schema.get_field_index(name)
                batch = batch.set_column(index, name, pa.nulls(batch.num_rows, batch.schema.field(name).type))
        return batch


class VisionCallPool(CallPoolStage):
    """A pool of VLM calls (by default inspect and describe)."""


class TextCallPool(CallPoolStage):
    """A pool of LLM calls (by default instruct and combine)."""


def pool_class(pool: CallPool) -> type[CallPoolStage]:
    """The actor class of ``pool`` (two names, so Ray's progress bars tell the pools apart)."""
    return VisionCallPool if pool.vision else TextCallPool
