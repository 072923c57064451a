"""One merge, start to finish: recipe -> plan -> routers -> staged write -> rename into place."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from mergekit_mode.card import model_card
from mergekit_mode.errors import ModeError
from mergekit_mode.executor import execute
from mergekit_mode.plan import BASE, Plan, build_plan
from mergekit_mode.recipe import load_recipe
from mergekit_mode.routers import RouterContext, make_routers
from mergekit_mode.writer import Entry, ShardedWriter, check_destination, staged_output

RECIPE_FILE = "mergekit_mode_recipe.yml"

# Files of the base that travel with the model: tokenizer and generation defaults.
_BASE_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def parse_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModeError(f"--device: {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModeError(f"--device: {device!r} requested but this torch has no usable CUDA device")
    return dev


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype layer-streamed runs compute in. `auto` is bfloat16 only where it is fast: a CUDA
    device that supports it, or a CPU with bfloat16 matrix units (AMX or AVX512-BF16); elsewhere
    bfloat16 matmuls are emulated, slower than float32, so it is float32."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and _cpu_has_bf16_units() else torch.float32


def _cpu_has_bf16_units(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def plan_recipe(recipe_path: Path) -> Plan:
    """Load, validate and plan a recipe; input errors are prefixed with the recipe's path."""
    loaded = load_recipe(recipe_path)
    try:
        return build_plan(loaded)
    except ModeError as e:
        raise ModeError(f"{recipe_path}: {e}") from None


def write_model(plan: Plan, out: Path, *, force: bool = False, device: str = "cpu", quiet: bool = False,
                dtype: str = "float32") -> None:
    """Build the plan's model into `out`. Either `out` ends complete, or it is left as it was.
    `dtype` is the compute dtype of routers made from data (COMPUTE_DTYPES)."""
    dev = parse_device(device)
    _refuse_inputs_inside(plan, out)
    check_destination(out, force, plan.total_bytes)  # before routers that may train for minutes
    routers = make_routers(plan, RouterContext(dev, quiet, compute_dtype(dtype, dev)))
    entries = [Entry(t.name, t.shape, t.dtype) for t in plan.tensors]
    try:
        with staged_output(out, force, plan.total_bytes) as stage:
            writer = ShardedWriter(stage, entries, plan.recipe.recipe.output.shard_size)
            bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="Writing", disable=quiet, leave=False)
            done = 0

            def progress(item) -> None:
                nonlocal done
                done += 1
                bar.update(item.nbytes)
                bar.set_postfix_str(f"{done}/{len(entries)} tensors", refresh=False)

            try:
                execute(plan, routers, writer, dev, progress)
            finally:
                writer.abort()
                bar.close()
            _write_side_files(plan, stage)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ModeError(f"{out}: no space left on the device while writing ({e.filename or 'output'})") from None
        raise ModeError(f"{out}: {e.strerror or e} ({e.filename or 'output'})") from None


def _refuse_inputs_inside(plan: Plan, out: Path) -> None:
    """Replacing `out` (--force) or staging beside it must never touch an input."""
    target = out.resolve()
    for key, folder in plan.inputs.items():
        src = folder.path.resolve()
        if src == target or target in src.parents or src in target.parents:
            raise ModeError(f"{out}: overlaps input {key} ({folder.path}); write the output elsewhere")


def _write_side_files(plan: Plan, stage: Path) -> None:
    (stage / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    base = plan.inputs[BASE].path
    for name in _BASE_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, stage / name)
    (stage / "README.md").write_text(model_card(plan))
    (stage / RECIPE_FILE).write_text(plan.recipe.text)
