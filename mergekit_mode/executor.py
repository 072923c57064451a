"""Walking the plan: read each tensor's inputs, compute it, hand it to the writer, drop it.

Only the tensor in flight is held: peak memory is one output tensor and its inputs, whatever the
model's size. Every float that is used is checked for NaN/Inf as it streams past, so a damaged
input fails the run with its name instead of yielding a model that loads and outputs garbage.
"""

from __future__ import annotations

from typing import Callable

import torch

from mergekit_mode.adapters import merge_lora
from mergekit_mode.errors import ModeError
from mergekit_mode.inputs import TensorReader
from mergekit_mode.ops import Copy, LoraMerge, Mean, RouterWeights, Source
from mergekit_mode.plan import OutputTensor, Plan
from mergekit_mode.writer import ShardedWriter

Progress = Callable[[OutputTensor], None]


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ModeError(f"{what}: contains NaN or Inf")


class _Inputs:
    """Reads plan sources onto the compute device, checking each for NaN/Inf as it streams past."""

    def __init__(self, plan: Plan, reader: TensorReader, device: torch.device) -> None:
        self.plan, self.reader, self.device = plan, reader, device

    def read(self, source: Source) -> torch.Tensor:
        info = self.plan.inputs[source.model].tensors[source.tensor]
        tensor = self.reader.read(info)
        _check_finite(tensor, f"{info.file}: tensor {info.name}")
        return tensor

    def float(self, source: Source) -> torch.Tensor:
        return self.read(source).to(self.device, torch.float32)

    def merged(self, op: LoraMerge, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The merged weight in float32; `weight` is op.base when the caller already holds it."""
        magnitude = self.float(op.magnitude) if op.magnitude else None
        base = self.float(op.base) if weight is None else weight
        return merge_lora(base, self.float(op.lora_A), self.float(op.lora_B), op.scale, op.transpose, magnitude)

    def mean(self, op: Mean) -> torch.Tensor:
        base = self.float(op.base)
        total = torch.zeros_like(base)
        for change in op.changes:
            old = base if change.old == op.base else self.float(change.old)
            # a LoraMerge's base is its change's `old` (plan._Expert.change); a Copy is a saved module
            new = self.merged(change.new, old) if isinstance(change.new, LoraMerge) else self.float(change.new.source)
            total += new - old
        return base + total / op.count


def compute(item: OutputTensor, inputs: _Inputs, routers: list[torch.Tensor]) -> torch.Tensor:
    op = item.op
    if isinstance(op, Copy):
        tensor = inputs.read(op.source)
        return tensor if tensor.dtype == item.dtype else tensor.to(inputs.device).to(item.dtype)
    if isinstance(op, RouterWeights):
        tensor = routers[op.layer]
        what = f"router of layer {op.layer}"
    elif isinstance(op, LoraMerge):
        tensor = inputs.merged(op)
        what = f"{item.name} (merged {op})"
    elif isinstance(op, Mean):
        tensor = inputs.mean(op)
        what = f"{item.name} ({op})"
    else:
        raise AssertionError(f"no executor for {op!r}")
    _check_finite(tensor, what)
    return tensor.to(item.dtype)


def execute(
    plan: Plan, routers: list[torch.Tensor], writer: ShardedWriter, device: torch.device, progress: Progress
) -> None:
    with TensorReader() as reader:
        inputs = _Inputs(plan, reader, device)
        for item in plan.tensors:
            writer.write(item.name, compute(item, inputs, routers))
            progress(item)
    writer.finish()
