"""One merge, start to finish: recipe -> plan -> routers -> staged write -> rename into place."""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from mergekit_mode.card import model_card
from mergekit_mode.check import CheckReport, gate, run_recipe_checks
from mergekit_mode.errors import ModeError
from mergekit_mode.executor import execute
from mergekit_mode.plan import Plan, build_plan
from mergekit_mode.provenance import RECIPE_FILE, write_record
from mergekit_mode.recipe import load_recipe
from mergekit_mode.routers import RouterContext, make_routers
from mergekit_mode.writer import Entry, ShardedWriter, check_destination, staged_output



@dataclass(frozen=True)
class Edit:
    """A build that takes what it can from a previous one (`mergekit-mode edit`): `execution` is the
    plan with unchanged tensors copied from that build, `routers` makes the routers the edit needs."""

    execution: Plan
    routers: Callable[[RouterContext], list[torch.Tensor]]
    card_note: Optional[str] = None


def parse_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModeError(f"--device: {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModeError(f"--device: {device!r} requested but this torch has no usable CUDA device")
    return dev


def plan_recipe(recipe_path: Path) -> Plan:
    """Load, validate and plan a recipe; input errors are prefixed with the recipe's path."""
    loaded = load_recipe(recipe_path)
    try:
        return build_plan(loaded)
    except ModeError as e:
        raise ModeError(f"{recipe_path}: {e}") from None


def write_model(plan: Plan, out: Path, *, force: bool = False, device: str = "cpu", quiet: bool = False,
                keep_failed: bool = False, edit: Edit | None = None) -> tuple[CheckReport, ...]:
    """Build the plan's model into `out`. Either `out` ends complete, or it is left as it was.

    The recipe's `checks:` run on the finished model before it is renamed into place: when one fails,
    CheckFailed is raised and `out` is left as it was, unless `keep_failed`. `edit`: how `edit` makes
    the same model from a previous build (what to execute, its routers, a line for the card)."""
    dev = parse_device(device)
    execution = edit.execution if edit else plan
    _refuse_inputs_inside(execution, out)
    check_destination(out, force, plan.total_bytes)  # before routers that may train for minutes
    routers = edit.routers(RouterContext(dev, quiet)) if edit else make_routers(plan, RouterContext(dev, quiet))
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
                execute(execution, routers, writer, dev, progress)
            finally:
                writer.abort()
                bar.close()
            _write_side_files(plan, stage, out, edit.card_note if edit else None)
            reports = run_recipe_checks(plan.recipe, stage, dev, quiet)
            if not keep_failed:
                gate(reports, out, kept=False)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ModeError(f"{out}: no space left on the device while writing ({e.filename or 'output'})") from None
        raise ModeError(f"{out}: {e.strerror or e} ({e.filename or 'output'})") from None
    gate(reports, out, kept=True)
    return reports


def _refuse_inputs_inside(plan: Plan, out: Path) -> None:
    """Replacing `out` (--force) or staging beside it must never touch an input."""
    target = out.resolve()
    for key, folder in plan.inputs.items():
        src = folder.path.resolve()
        if src == target or target in src.parents or src in target.parents:
            raise ModeError(f"{out}: overlaps input {key} ({folder.path}); write the output elsewhere")


def _write_side_files(plan: Plan, stage: Path, out: Path, card_note: str | None) -> None:
    (stage / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    for name, content in plan.carried.files:  # tokenizer and generation settings (tokenizer_audit)
        if isinstance(content, bytes):
            (stage / name).write_bytes(content)
        else:
            shutil.copyfile(content, stage / name)
    (stage / "README.md").write_text(model_card(plan, card_note))
    (stage / RECIPE_FILE).write_text(plan.recipe.text)
    write_record(plan, stage, out)
