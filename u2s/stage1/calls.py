"""Stage-1 model calls, by name: the one list of calls.

A call is one :class:`CallSpec`: its prompt (a builder of :mod:`u2s.stage1.prompts`), its result model
(:mod:`u2s.stage1.schemas`), the columns it reads and writes, which rows it wants and how a validated
answer lands in the row, its token budget, whether it sees the image (the VLM's pool) or text only (the
LLM's), whether it shares the pool of the call before it, and the token counts ``u2s plan`` estimates
its cost from. The job config (``stage1.calls.<name>``, which calls run and in which pools), the pools'
call chains and the plan are derived from :data:`CALLS`.

A call with behaviour beyond one question per row names its stage class (``stage``, e.g. inspect's
per-criterion mode); every other call runs on the generic :class:`~u2s.stage1.call.ModelCallStage`.
A call kept outside the package is added with :func:`register_call` (in every process that validates
a config or runs the call's pool, like :func:`~u2s.stage1.engines.register_engine`); the columns it
writes must be columns of :data:`u2s.schema.WORKING_SCHEMA`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa
    from pydantic import BaseModel

#: ``messages(row, class_hint)``: the chat messages of one row (``class_hint``: ``stage1.default_class_hint``
#: for rows without a label).
Messages = Callable[[dict, str], list[dict]]


@dataclass(frozen=True)
class CallSpec:
    """One stage-1 call, declared once."""

    name: str
    #: The description of ``stage1.calls.<name>`` in the job config.
    description: str
    #: Whether the call sends the row's image (it runs on the VLM) or text only (the text LLM).
    vision: bool
    #: The pydantic model an answer must validate against (its JSON schema constrains decoding), or its
    #: ``"module:Class"`` (the registry stays importable without pyarrow: the job config reads it).
    result_model: type[BaseModel] | str
    #: Columns the call reads and writes (besides the row's id, status, error and timings).
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    #: The conversation asking this call's question about one row.
    messages: Messages | None = None
    #: Writes a validated answer into the row's columns (status changes such as ``kept`` included).
    apply: Callable[[dict, Any], None] | None = None
    #: The rows the call has work for (an Arrow mask); None: every row still in flight.
    wanted: Callable[[pa.Table], pa.ChunkedArray] | None = None
    #: Default token budget (``stage1.calls.<name>.generation.max_new_tokens``).
    max_new_tokens: int = 512
    #: Default pool: its own (True), or the pool of the call before it (same model and engine).
    own_pool: bool = True
    #: The ``stage1.mode`` values the call runs in.
    modes: tuple[str, ...] = ("paper", "fused")
    #: A boolean ``stage1`` field that switches the call on (None: always on in its modes).
    switch: str | None = None
    #: Whether the call sees every row (the others see flagged rows only), for ``u2s plan``.
    every_row: bool = False
    #: Tokens of one call (prompt, output), for ``u2s plan``'s FLOP estimate.
    plan_tokens: tuple[int, int] = (400, 60)
    #: The stage class that runs the call (``"module:Class"``, imported where the pool runs); None: the
    #: generic :class:`~u2s.stage1.call.ModelCallStage` with ``messages``, ``apply`` and ``wanted``.
    stage: str | type | None = None
    #: Per ``stage1.mode``, a stage class that replaces ``stage`` (the fused call replaces inspect).
    variants: Mapping[str, str | type] = field(default_factory=dict)
    #: Per ``stage1.mode``, the call whose token budget this call uses (the fused call writes captions).
    budget_of: Mapping[str, str] = field(default_factory=dict)

    def runs(self, stage1: Any) -> bool:
        """Whether the call runs under the stage-1 config ``stage1`` (its ``mode`` and ``switch``)."""
        return stage1.mode in self.modes and (self.switch is None or bool(getattr(stage1, self.switch)))

    def stage_for(self, mode: str) -> str | type | None:
        """The stage class (or its ``"module:Class"``) that runs the call in ``mode``."""
        return self.variants.get(mode, self.stage)

    def result_class(self) -> type[BaseModel]:
        """:attr:`result_model`, imported when named by ``"module:Class"``."""
        return resolve(self.result_model)


def resolve(reference: Any) -> Any:
    """``reference`` itself, or the object a ``"module:Name"`` string names (imported here)."""
    if not isinstance(reference, str):
        return reference
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def _hint(row: dict, class_hint: str) -> str:
    return row["label"] or class_hint


# The built-in calls' prompts, masks and results. Their modules load pyarrow, so they are imported when a
# call runs, not with the registry.


def _inspect_messages(row: dict, class_hint: str) -> list[dict]:
    from u2s.stage1.prompts import inspect_messages

    return inspect_messages()


def _describe_messages(row: dict, class_hint: str) -> list[dict]:
    from u2s.stage1.prompts import describe_messages

    return describe_messages(_hint(row, class_hint))


def _instruct_messages(row: dict, class_hint: str) -> list[dict]:
    from u2s.stage1.prompts import instruct_messages

    return instruct_messages(row["public_caption"])


def _combine_messages(row: dict, class_hint: str) -> list[dict]:
    from u2s.stage1.prompts import combine_messages

    return combine_messages(row["public_caption"], row["edit_instruction"], _hint(row, class_hint))


def _flagged(batch: pa.Table) -> pa.ChunkedArray:
    from u2s.stage import flagged

    return flagged(batch)


def _instruct_wanted(batch: pa.Table) -> pa.ChunkedArray:
    import pyarrow.compute as pc

    from u2s.stage import flagged, has_text

    return pc.and_(flagged(batch), has_text(batch, "public_caption"))


def _combine_wanted(batch: pa.Table) -> pa.ChunkedArray:
    import pyarrow.compute as pc

    from u2s.stage import has_text

    return pc.and_(_instruct_wanted(batch), has_text(batch, "edit_instruction"))


def _inspect_apply(row: dict, result: Any) -> None:
    flag_row(row, [c.value for c in result.categories], result.privacy_flag)


def _describe_apply(row: dict, result: Any) -> None:
    row["review"] = [item.model_dump(mode="json") for item in result.review]
    row["private_caption"] = result.private_caption
    row["public_caption"] = result.public_caption


def _instruct_apply(row: dict, result: Any) -> None:
    row["edit_instruction"] = result.edit_instruction


def _combine_apply(row: dict, result: Any) -> None:
    row["combined_caption"] = result.combined_caption


def flag_row(row: dict, categories: list[str], flag: bool = False) -> None:
    """Flagged when ``flag`` or any category is present; unflagged rows are kept (they end here)."""
    row["categories"] = categories
    row["privacy_flag"] = flag or bool(categories)
    if not row["privacy_flag"]:
        row["status"] = "kept"  # u2s.schema.Status.KEPT


# The token budgets are the paper's (PAPER.md §2.1); describe and combine share the pool of the call
# before them (same model and engine: the model loads once). Plan tokens: a 448 px tile is 256 vision
# tokens.
_RESULTS = "u2s.stage1.schemas:"
_BUILTIN = (
    CallSpec(
        name="inspect",
        description="Call A: the VLM flags every decoded image (the fused call in fused mode).",
        vision=True, result_model=_RESULTS + "InspectResult",
        reads=("thumbnail", "frame_thumbnails"), writes=("privacy_flag", "categories", "flagged_frame"),
        messages=_inspect_messages, apply=_inspect_apply,
        max_new_tokens=128, every_row=True,
        plan_tokens=(256 + 300, 16),  # image + flag question; a short JSON flag
        stage="u2s.stage1.inspect:InspectStage", variants={"fused": "u2s.stage1.fused:FusedInspectStage"},
        budget_of={"fused": "describe"},
    ),
    CallSpec(
        name="describe",
        description="Call B: the VLM reviews flagged images and writes both captions. In fused mode its "
        "`generation` is the fused call's budget (that call writes the captions); its pool is unused.",
        vision=True, result_model=_RESULTS + "DescribeResult",
        reads=("thumbnail", "label"), writes=("review", "private_caption", "public_caption"),
        messages=_describe_messages, apply=_describe_apply, wanted=_flagged,
        max_new_tokens=1024, own_pool=False, modes=("paper",),
        plan_tokens=(256 + 450, 350),  # image + dual-caption instructions; two captions and a review
        stage="u2s.stage1.describe:DescribeStage",
    ),
    CallSpec(
        name="instruct",
        description="Call C: the LLM writes the edit instruction.",
        vision=False, result_model=_RESULTS + "InstructResult",
        reads=("public_caption",), writes=("edit_instruction",),
        messages=_instruct_messages, apply=_instruct_apply,
        wanted=_instruct_wanted,
        max_new_tokens=512,
        plan_tokens=(350, 60),  # public caption + instructions; one edit phrase
        stage="u2s.stage1.instruct:InstructStage",
    ),
    CallSpec(
        name="combine",
        description="Call D (when `stage1.combine`): the LLM merges public caption and edit instruction.",
        vision=False, result_model=_RESULTS + "CombineResult",
        reads=("label", "public_caption", "edit_instruction"), writes=("combined_caption",),
        messages=_combine_messages, apply=_combine_apply, wanted=_combine_wanted,
        max_new_tokens=512, own_pool=False, switch="combine",
        plan_tokens=(400, 60),  # caption + edit; one caption under 50 words
        stage="u2s.stage1.combine:CombineStage",
    ),
)  # fmt: skip

#: Call name → declaration, in the order the calls run (a row flows through them in this order).
CALLS: dict[str, CallSpec] = {spec.name: spec for spec in _BUILTIN}


def register_call(spec: CallSpec) -> CallSpec:
    """Add ``spec`` to :data:`CALLS` (after the calls already there; replacing a call of that name keeps its
    place); returns it."""
    CALLS[spec.name] = spec
    return spec


__all__ = ["CALLS", "CallSpec", "Messages", "flag_row", "register_call"]
