"""Walking the plan: read each tensor's inputs, compute it, hand it to the writer, drop it.

Only the tensors in flight are held (the one being written and the next ones being read ahead):
peak memory is a few tensors, whatever the model's size.
"""

from __future__ import annotations

from typing import Callable

import torch

from mergekit_mode.errors import ModeError
from mergekit_mode.inputs import Prefetcher, TensorReader
from mergekit_mode.numerics import all_finite
from mergekit_mode.plan import Copy, OutputTensor, Plan, RouterWeights, StemMerge
from mergekit_mode.stem import merge
from mergekit_mode.writer import ShardedWriter

Progress = Callable[[OutputTensor], None]


def compute(
    item: OutputTensor, plan: Plan, reader: Prefetcher, routers: list[torch.Tensor], device: torch.device
) -> torch.Tensor:
    op = item.op
    if isinstance(op, Copy):
        info = plan.inputs[op.source.model].tensors[op.source.tensor]
        tensor = reader.read(info)
        if tensor.dtype != item.dtype:
            tensor = tensor.to(device).to(item.dtype)
            if not all_finite(tensor):
                raise ModeError(f"{info.file}: tensor {info.name} overflows {item.dtype} (values beyond its range)")
        return tensor
    if isinstance(op, RouterWeights):
        tensor = routers[op.layer].to(item.dtype)
        if not all_finite(tensor):
            raise ModeError(f"router of layer {op.layer}: contains NaN or Inf")
        return tensor
    if isinstance(op, StemMerge):
        tensors = [reader.read(plan.inputs[s.model].tensors[s.tensor]).to(device) for s in op.sources]
        tensor = merge(op, item.name, tensors, item.dtype)
        if not all_finite(tensor):
            raise ModeError(f"stem: {op.method} made NaN or Inf in {item.name} (check the weights, e.g. a zero sum)")
        return tensor
    raise AssertionError(f"no executor for {op!r}")


def execute(
    plan: Plan, routers: list[torch.Tensor], writer: ShardedWriter, device: torch.device, progress: Progress
) -> None:
    with TensorReader() as reader:
        prefetcher = Prefetcher(reader, plan.reads())
        try:
            for item in plan.tensors:
                writer.write(item.name, compute(item, plan, prefetcher, routers, device))
                progress(item)
        finally:
            prefetcher.close()
    writer.finish()
