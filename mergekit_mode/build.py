"""One merge, start to finish: recipe -> plan -> routers -> staged write -> rename into place."""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from mergekit_mode.card import model_card
from mergekit_mode.check import CheckReport, gate, run_recipe_checks
from mergekit_mode.errors import ModeError
from mergekit_mode.executor import execute
from mergekit_mode.plan import Gates, Plan, build_plan
from mergekit_mode.provenance import BUILD_FILE, record_bytes
from mergekit_mode.recipe import load_recipe
from mergekit_mode.routers import RouterContext, make_routers
from mergekit_mode.safety import check_regular_inside, contains
from mergekit_mode.writer import (RECIPE_FILE, Entry, ShardedWriter, check_destination, copy_new, create_file,
                                  staged_output)


@dataclass(frozen=True)
class Edit:
    """A build that takes what it can from a previous one (`mergekit-mode edit`): `execution` is the
    plan with unchanged tensors copied from that build, `routers` makes the routers the edit needs."""

    execution: Plan
    routers: Callable[[RouterContext], Gates]
    card_note: Optional[str] = None


def parse_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModeError(f"--device: {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type not in ("cpu", "cuda"):  # meta computes nothing; mps and others are untested here
        raise ModeError(f"--device: {device!r} is not supported; use cpu, cuda or cuda:N")
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
        plan = build_plan(loaded)
        _side_files(plan)
    except ModeError as e:
        raise ModeError(f"{recipe_path}: {e}") from None
    return plan


def write_model(plan: Plan, out: Path, *, force: bool = False, replace_foreign: bool = False, device: str = "cpu",
                quiet: bool = False, keep_failed: bool = False, edit: Edit | None = None,
                dtype: str = "float32") -> tuple[CheckReport, ...]:
    """Build the plan's model into `out`. Either `out` ends complete, or it is left as it was.

    The recipe's `checks:` run on the finished model before it is renamed into place: when one fails,
    CheckFailed is raised and `out` is left as it was, unless `keep_failed`. `edit`: how `edit` makes
    the same model from a previous build (what to execute, its routers, a line for the card). `dtype`
    is the compute dtype of routers made from data (float32, bfloat16 or auto: compute_dtype)."""
    dev = parse_device(device)
    execution = edit.execution if edit else plan
    check_output(execution, out, force, replace_foreign)  # before routers that may train for minutes
    side_files = _side_files(plan)
    ctx = RouterContext(dev, quiet, compute_dtype(dtype, dev))
    routers = edit.routers(ctx) if edit else make_routers(plan, ctx)
    entries = [Entry(t.name, t.shape, t.dtype) for t in plan.tensors]
    try:
        with staged_output(out, force, plan.total_bytes, replace_foreign=replace_foreign) as stage:
            writer = ShardedWriter(stage, entries, plan.recipe.recipe.output.shard_size)
            bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="Writing", disable=quiet, leave=False)
            done = 0

            def progress(item) -> None:
                nonlocal done
                done += 1
                bar.update(item.nbytes)
                bar.set_postfix_str(f"{done}/{len(entries)} tensors", refresh=False)

            try:
                execute(execution, routers, writer, dev, progress)
            finally:
                writer.abort()
                bar.close()
            _write_side_files(plan, stage, side_files, out, edit.card_note if edit else None)
            reports = run_recipe_checks(plan.recipe, stage, dev, quiet)
            if not keep_failed:
                gate(reports, out, kept=False)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ModeError(f"{out}: no space left on the device while writing ({e.filename or 'output'})") from None
        raise ModeError(f"{out}: {e.strerror or e} ({e.filename or 'output'})") from None
    gate(reports, out, kept=True)
    return reports


def read_paths(plan: Plan) -> dict[str, Path]:
    """Every file and folder a build of `plan` reads, by the recipe field that names it."""
    loaded = plan.recipe
    paths = {"recipe": loaded.path}
    paths.update((key, folder.path) for key, folder in plan.inputs.items())
    for i, spec in enumerate(loaded.recipe.experts):
        if spec.data is not None:
            paths[f"experts[{i}].data"] = loaded.resolve(spec.data)
    return paths


def check_output(plan: Plan, out: Path, force: bool, replace_foreign: bool = False) -> None:
    """Before any work: `out` is apart from every input (check_apart) and a destination we may
    write (check_destination)."""
    check_apart(plan, out)
    check_destination(out, force, plan.total_bytes, replace_foreign=replace_foreign)


def check_apart(plan: Plan, out: Path, also_read: dict[str, Path] | None = None) -> None:
    """`out` neither is, contains nor lies inside anything the run reads (`also_read`: more of
    those, e.g. --data), through links or not: replacing it (--force) or staging beside it must
    never touch an input, and an output must not appear inside an input folder."""
    for key, path in {**read_paths(plan), **(also_read or {})}.items():
        if contains(path, out) or contains(out, path):
            raise ModeError(f"{out}: overlaps input {key} ({path}); write the output elsewhere")


def _side_files(plan: Plan) -> list[tuple[str, Path | bytes]]:
    """The tokenizer and generation files to carry (tokenizer_audit chose them, and loaded each
    tokenizer they come from), each checked to really be its folder's own regular file (a planted
    link to ~/.ssh/id_rsa must not travel with the model)."""
    carried = plan.carried
    for name, content in carried.files:
        if isinstance(content, Path):
            check_regular_inside(content, content.parent, dict(carried.folders).get(content.parent, name))
    return list(carried.files)


def _write_side_files(plan: Plan, stage: Path, files: list[tuple[str, Path | bytes]], out: Path,
                      card_note: str | None) -> None:
    create_file(stage / "config.json", (json.dumps(plan.config, indent=2) + "\n").encode())
    for name, content in files:
        if isinstance(content, bytes):  # rewritten (a pad token left unset)
            create_file(stage / name, content)
        else:
            copy_new(content, stage / name)
    create_file(stage / "README.md", model_card(plan, card_note).encode())
    create_file(stage / RECIPE_FILE, plan.recipe.text.encode())
    create_file(stage / BUILD_FILE, record_bytes(plan, out))
