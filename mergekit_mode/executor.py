"""Walking the plan: read each tensor's inputs, compute it, hand it to the writer, drop it.

Only the tensor in flight is held: peak memory is one output tensor and its inputs, whatever the
model's size. Every float that is used is checked for NaN/Inf as it streams past, so a damaged
input fails the run with its name instead of yielding a model that loads and outputs garbage.
"""

from __future__ import annotations

from typing import Callable

import torch

from mergekit_mode.errors import ModeError
from mergekit_mode.inputs import TensorReader
from mergekit_mode.plan import Copy, OutputTensor, Plan, RouterWeights
from mergekit_mode.writer import ShardedWriter

Progress = Callable[[OutputTensor], None]


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ModeError(f"{what}: contains NaN or Inf")


def compute(
    item: OutputTensor, plan: Plan, reader: TensorReader, routers: list[torch.Tensor], device: torch.device
) -> torch.Tensor:
    op = item.op
    if isinstance(op, Copy):
        folder = plan.inputs[op.source.model]
        info = folder.tensors[op.source.tensor]
        tensor = reader.read(info)
        _check_finite(tensor, f"{info.file}: tensor {info.name}")
        if tensor.dtype != item.dtype:
            tensor = tensor.to(device).to(item.dtype)
        return tensor
    if isinstance(op, RouterWeights):
        tensor = routers[op.layer].to(item.dtype)
        _check_finite(tensor, f"router of layer {op.layer}")
        return tensor
    raise AssertionError(f"no executor for {op!r}")


def execute(
    plan: Plan, routers: list[torch.Tensor], writer: ShardedWriter, device: torch.device, progress: Progress
) -> None:
    with TensorReader() as reader:
        for item in plan.tensors:
            writer.write(item.name, compute(item, plan, reader, routers, device))
            progress(item)
    writer.finish()
