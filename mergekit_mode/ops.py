"""The plan's vocabulary: where an output tensor comes from, as small frozen dataclasses.

Ops are plain data (printable for `--dry-run`, comparable in tests); the executor gives them
meaning. Each op lists its `sources` in the order the executor reads them, so the reader can
fetch them ahead (Plan.reads). A `Source` names a tensor of one input of the plan: the base, a full fine-tune, an
adapter (keyed by its expert's name) or the fine-tune an adapter is applied to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from mergekit_mode.recipe import RESERVED_NAME

BASE = RESERVED_NAME  # the key of the recipe's base among the inputs; no expert may take this name
Params = tuple[tuple[str, Any], ...]  # a merge method's parameter values, resolved for one tensor


@dataclass(frozen=True)
class Source:
    """A tensor of an input: `model` is an input key of the plan (BASE, an expert's name for its
    fine-tune or its adapter, experts.model_key(name) for the fine-tune an adapter is applied to)."""

    model: str
    tensor: str

    def __str__(self) -> str:
        return f"{self.model}:{self.tensor}"


@dataclass(frozen=True)
class Copy:
    """The output is the source tensor, cast to the output dtype."""

    source: Source

    @property
    def sources(self) -> tuple[Source, ...]:
        return (self.source,)

    def __str__(self) -> str:
        return f"copy {self.source}"


@dataclass(frozen=True)
class RouterWeights:
    """The output is the router of `layer`, made by the recipe's router mode."""

    layer: int
    mode: str

    @property
    def sources(self) -> tuple[Source, ...]:
        return ()  # computed before the write pass, reads nothing here

    def __str__(self) -> str:
        return f"router {self.mode} (layer {self.layer})"


@dataclass(frozen=True)
class SharedGate:
    """The output is the shared expert's gate of `layer` (formats with a shared expert), made with the
    routers."""

    layer: int

    @property
    def sources(self) -> tuple[Source, ...]:
        return ()

    def __str__(self) -> str:
        return f"shared expert gate (layer {self.layer})"


@dataclass(frozen=True)
class Zeros:
    """The output is all zeros (an unused shared expert: it adds nothing)."""

    @property
    def sources(self) -> tuple[Source, ...]:
        return ()

    def __str__(self) -> str:
        return "zeros"


@dataclass(frozen=True)
class LoraMerge:
    """The output is `base` with an expert's LoRA merged in (adapters.merge_lora), in float32."""

    base: Source
    lora_A: Source
    lora_B: Source
    scale: float
    transpose: bool  # embedding layers: peft merges (B @ A).T
    magnitude: Source | None = None  # DoRA

    @property
    def lora_sources(self) -> tuple[Source, ...]:
        """The adapter's tensors, in read order (after `base`)."""
        return (self.lora_A, self.lora_B) + ((self.magnitude,) if self.magnitude else ())

    @property
    def sources(self) -> tuple[Source, ...]:
        return (self.base,) + self.lora_sources

    def __str__(self) -> str:
        dora = ", dora" if self.magnitude else ""
        return f"{self.base} + lora {self.lora_A.model} (scale {self.scale:g}{dora})"


@dataclass(frozen=True)
class Change:
    """What one expert's adapter does to a tensor: `new` minus the weights `old` it was applied to."""

    expert: str
    new: Union[LoraMerge, Copy]
    old: Source


@dataclass(frozen=True)
class Mean:
    """The output is `base` plus the sum of the changes divided by `count`: the mean change over
    `count` experts, those not listed counting as a zero change (the `average` shared-delta policy)."""

    base: Source
    changes: tuple[Change, ...]
    count: int

    @property
    def sources(self) -> tuple[Source, ...]:
        """`base`, then per change: its `old` unless that is `base`, and what `new` reads besides `old`."""
        reads = [self.base]
        for change in self.changes:
            if change.old != self.base:
                reads.append(change.old)
            reads += change.new.lora_sources if isinstance(change.new, LoraMerge) else change.new.sources
        return tuple(reads)

    def __str__(self) -> str:
        terms = " + ".join(f"Δ{c.expert}" for c in self.changes)
        return f"{self.base} + ({terms}) / {self.count}"


@dataclass(frozen=True)
class StemMerge:
    """The output is mergekit's `method` applied to each stem model's version of the tensor.

    `models` are mergekit's ids (expert names, BASE); `inputs[i]` gives models[i]'s tensor: a copy,
    or for an adapter expert its merged weight. Parameters are resolved for this tensor at plan
    time: `parameters` are the method's shared ones, `input_parameters[i]` those of models[i];
    models[base_index] is the method's base.
    """

    method: str
    models: tuple[str, ...]
    inputs: tuple[Union[Copy, LoraMerge], ...]
    base_index: Optional[int]
    parameters: Params
    input_parameters: tuple[Params, ...]
    seed: int

    @property
    def sources(self) -> tuple[Source, ...]:
        return tuple(s for op in self.inputs for s in op.sources)

    def __str__(self) -> str:
        def fmt(params: Params) -> str:
            return " ".join(f"{k}={v}" for k, v in params)

        inputs = [f"{m}{'*' if i == self.base_index else ''}" + (f"[{fmt(p)}]" if p else "")
                  for i, (m, p) in enumerate(zip(self.models, self.input_parameters))]
        return f"{self.method}({', '.join(inputs)}{'; ' + fmt(self.parameters) if self.parameters else ''})"


Op = Union[Copy, RouterWeights, SharedGate, Zeros, LoraMerge, Mean, StemMerge]
