"""Walking the plan: read each tensor's inputs, compute it, hand it to the writer, drop it.

Only the tensors in flight are held (the one being written and the next ones being read ahead):
peak memory is a few tensors, whatever the model's size.
"""

from __future__ import annotations

from typing import Callable

import torch

from mergekit_mode.adapters import merge_lora
from mergekit_mode.errors import ModeError
from mergekit_mode.inputs import BufferPool, Prefetcher, TensorReader
from mergekit_mode.numerics import all_finite
from mergekit_mode.ops import Copy, LoraMerge, Mean, RouterWeights, SharedGate, Source, StemMerge, Zeros
from mergekit_mode.plan import Gates, OutputTensor, Plan
from mergekit_mode.writer import ShardedWriter

Progress = Callable[[OutputTensor], None]


class _Inputs:
    """Reads plan sources, in the order their ops list them (the prefetcher expects exactly that),
    onto the compute device. The reader has checked them for NaN/Inf."""

    def __init__(self, plan: Plan, reader: Prefetcher, device: torch.device) -> None:
        self.plan, self.reader, self.device = plan, reader, device
        self.held: list[torch.Tensor] = []  # what the current output tensor read

    def read(self, source: Source) -> torch.Tensor:
        tensor = self.reader.read(self.plan.info(source))
        self.held.append(tensor)
        return tensor

    def float(self, source: Source) -> torch.Tensor:
        return self.read(source).to(self.device, torch.float32)

    def merged(self, op: LoraMerge, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The merged weight in float32; `weight` is op.base when the caller already holds it."""
        base = self.float(op.base) if weight is None else weight
        lora_A, lora_B = self.float(op.lora_A), self.float(op.lora_B)
        magnitude = self.float(op.magnitude) if op.magnitude else None
        return merge_lora(base, lora_A, lora_B, op.scale, op.transpose, magnitude)

    def version(self, op: Copy | LoraMerge) -> torch.Tensor:
        """One stem model's tensor on the device: as stored, or an adapter expert's merge."""
        return self.read(op.source).to(self.device) if isinstance(op, Copy) else self.merged(op)

    def mean(self, op: Mean) -> torch.Tensor:
        base = self.float(op.base)
        total = torch.zeros_like(base)
        for change in op.changes:
            old = base if change.old == op.base else self.float(change.old)
            # a LoraMerge's base is its change's `old` (experts.Expert.change); a Copy is a saved module
            new = self.merged(change.new, old) if isinstance(change.new, LoraMerge) else self.float(change.new.source)
            total.add_(new).sub_(old)
        return total.div_(op.count).add_(base)


def compute(item: OutputTensor, inputs: _Inputs, gates: Gates) -> torch.Tensor:
    op = item.op
    where = f"{item.name} ({op})"
    if isinstance(op, Copy):
        tensor = inputs.read(op.source)
        if tensor.dtype == item.dtype:
            return tensor  # the reader checked it as it streamed
        info = inputs.plan.info(op.source)
        tensor, where = tensor.to(inputs.device), f"{info.file}: tensor {info.name}"
        error = f"{where}: contains NaN or Inf"
    elif isinstance(op, RouterWeights):
        tensor, error = gates.routers[op.layer], f"router of layer {op.layer}: contains NaN or Inf"
    elif isinstance(op, SharedGate):
        tensor, error = gates.shared[op.layer], f"shared expert gate of layer {op.layer}: contains NaN or Inf"
    elif isinstance(op, Zeros):
        tensor, error = torch.zeros(item.shape, device=inputs.device), ""
    elif isinstance(op, LoraMerge):
        tensor, error = inputs.merged(op), f"{where}: contains NaN or Inf"
    elif isinstance(op, Mean):
        tensor, error = inputs.mean(op), f"{where}: contains NaN or Inf"
    elif isinstance(op, StemMerge):
        from mergekit_mode.stem import merge  # mergekit: only for recipes with a stem merge

        tensor = merge(op, item.name, [inputs.version(i) for i in op.inputs], item.dtype)
        error = f"stem: {op.method} made NaN or Inf in {item.name} (check the weights, e.g. a zero sum)"
    else:
        raise AssertionError(f"no executor for {op!r}")
    cast = tensor.to(item.dtype)
    if not all_finite(cast):  # after the cast: a value beyond float16's range is Inf there
        if all_finite(tensor):
            error = f"{where}: overflows {item.dtype} (values beyond its range)"
        raise ModeError(error)
    return cast


class _Rows(_Inputs):
    """Reads only some rows of each source (a copied embedding: the rows a text uses)."""

    def __init__(self, plan: Plan, reader: TensorReader, device: torch.device, rows: torch.Tensor) -> None:
        super().__init__(plan, reader, device)
        self.rows = rows

    def read(self, source: Source) -> torch.Tensor:
        return self.reader.read_rows(self.plan.info(source), self.rows)


def compute_alone(item: OutputTensor, plan: Plan, reader: TensorReader, device: torch.device,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """One output tensor outside the write pass, exactly as the write pass makes it (router
    training and layer-streamed runs use the output's own layers from these). With `rows`, only
    those rows of it: a copied tensor then reads only their bytes."""
    if rows is not None and isinstance(item.op, Copy):
        return compute(item, _Rows(plan, reader, device, rows), Gates([]))
    tensor = compute(item, _Inputs(plan, reader, device), Gates([]))
    return tensor if rows is None else tensor[rows.to(tensor.device)]


def execute(plan: Plan, gates: Gates, writer: ShardedWriter, device: torch.device, progress: Progress) -> None:
    pool = BufferPool()
    with TensorReader(pool) as reader:
        prefetcher = Prefetcher(reader, plan.reads())
        inputs = _Inputs(plan, prefetcher, device)
        try:
            for item in plan.tensors:
                tensor = compute(item, inputs, gates)
                writer.write(item.name, tensor)
                progress(item)
                # written: its bytes and its inputs' are free for the next reads (the gates are not ours)
                pool.give(*inputs.held, *([] if isinstance(item.op, (RouterWeights, SharedGate)) else [tensor]))
                inputs.held.clear()
                del tensor
        finally:
            prefetcher.close()
    writer.finish()
