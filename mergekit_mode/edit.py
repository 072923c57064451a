"""Expert surgery on a built MoE (`mergekit-mode edit`): drop, replace or add one expert.

An edit is a build of the edited recipe that takes from the previous build whatever it would make
the same. The plan says where every output tensor comes from (its op); the build record of MODEL
(provenance.py) says which op made which of MODEL's tensors and stamps the inputs they were read
from. An output tensor whose op is in the record, whose inputs' stamps are unchanged and whose
shape and dtype match is copied byte for byte from MODEL; every other tensor (the new expert's, a
shared tensor whose merge changed, say an `average` over adapters) is computed as a build computes
it. Nothing here knows a tensor name: the plan and the record do, whatever the output format.

Routers follow their definitions, so NEW's routers are what a full build of the edited recipe makes:
- gateless, noisy, random: computed from the definition, which costs nothing. A noisy/random row
  is drawn from a generator seeded by (seed, layer, expert name), so every kept expert keeps its
  row and a new expert gets the row a full build gives it.
- hidden: a row depends only on the base and its own expert's text; rows whose inputs are unchanged
  are taken from MODEL, only new rows are computed (one pass of the base over the new text).
- trained: rows are trained jointly, so an edit retrains, starting from MODEL's rows for the kept
  experts and from the recipe's `train.init` for new ones (`train.init: domain` then skips its
  classifier stage). NEW is then not the bytes of a full build; docs/edit.md states the measured
  difference in perplexity.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import yaml

from mergekit_mode.build import Edit
from mergekit_mode.errors import ModeError
from mergekit_mode.inputs import ModelFolder, TensorReader
from mergekit_mode.ops import Copy, RouterWeights, SharedGate, Source
from mergekit_mode.plan import Gates, Plan, build_plan
from mergekit_mode.provenance import built_recipe, folder_stamp, read_record, row_keys, versions
from mergekit_mode.recipe import LoadedRecipe, load_yaml, parse_recipe
from mergekit_mode.routers import RouterContext, as_gates, calibration, hidden_rows, make_routers

PREVIOUS = "previous build"  # the input key of MODEL in the edit's execution plan (a name with a space)


def _find(loaded: LoadedRecipe, name: str, option: str) -> int:
    names = loaded.recipe.expert_names
    if name not in names:
        raise ModeError(f"{option}: MODEL has no expert {name!r} ({', '.join(names)})")
    return names.index(name)


def _written(loaded: LoadedRecipe, path: Path) -> str:
    """`path` (given relative to the working folder) as the recipe writes its paths: relative to the
    recipe's folder, or absolute when its base_model is."""
    if loaded.recipe.base_model.is_absolute():
        return str(path.resolve())
    return os.path.relpath(path.resolve(), loaded.path.parent.resolve())


def _expert_entry(loaded: LoadedRecipe, name: str, path: Path, option: str) -> dict:
    """The recipe entry of expert `name` from the folder `path`: a model, or a peft adapter."""
    if not path.is_dir():
        raise ModeError(f"{option}: folder {path} does not exist")
    key = "adapter" if (path / "adapter_config.json").is_file() else "model"
    return {"name": name, key: _written(loaded, path)}


def edited_recipe(loaded: LoadedRecipe, drop: Optional[str], replace_: Optional[tuple[str, Path]],
                  add: Optional[tuple[str, Path]], data: Optional[Path]) -> LoadedRecipe:
    """The recipe with one expert dropped, replaced or added; checks of a dropped expert's domain go
    with it. It resolves against the same folder as the original."""
    spec = load_yaml(loaded.text, str(loaded.path))
    experts = spec["experts"]
    if sum(x is not None for x in (drop, replace_, add)) != 1:
        raise ModeError("give one of --drop NAME, --replace NAME=PATH, --add NAME=PATH")
    if data is not None and drop is not None:
        raise ModeError("--data: goes with --add or --replace (the new expert's text)")
    data_path = None
    if data is not None:
        if not data.is_file():
            raise ModeError(f"--data: {data} does not exist")
        data_path = _written(loaded, data)
    if drop is not None:
        del experts[_find(loaded, drop, "--drop")]
        _drop_checks(spec, drop)
    elif replace_ is not None:
        name, path = replace_
        index = _find(loaded, name, "--replace")
        old = experts[index] if isinstance(experts[index], dict) else {}
        kept = {k: v for k, v in old.items() if k not in ("name", "model", "adapter")}
        experts[index] = {**_expert_entry(loaded, name, path, "--replace"), **kept}
        if data_path is not None:
            experts[index]["data"] = data_path
    else:
        name, path = add
        if name in loaded.recipe.expert_names:
            raise ModeError(f"--add: MODEL already has an expert {name!r} (use --replace)")
        experts.append(_expert_entry(loaded, name, path, "--add") | ({"data": data_path} if data_path else {}))
    text = yaml.safe_dump(spec, sort_keys=False)
    try:
        recipe = parse_recipe(spec, "edited recipe")
    except ModeError as e:
        raise ModeError(f"{e} (the edit leaves the recipe invalid)") from None
    return LoadedRecipe(recipe=recipe, path=loaded.path, text=text)


def _drop_checks(spec: dict, name: str) -> None:
    """A dropped expert's domain leaves the `checks: against experts` (it has no expert to compare with)."""
    if not spec.get("checks"):
        return
    checks = spec["checks"] if isinstance(spec["checks"], list) else [spec["checks"]]
    for check in checks:
        if isinstance(check, dict) and check.get("against", "experts") == "experts":
            (check.get("data") or {}).pop(name, None)
    spec["checks"] = [c for c in checks if not isinstance(c, dict) or c.get("data")]
    if not spec["checks"]:
        del spec["checks"]


def _routers_of(record: dict) -> dict[int, str]:
    """MODEL's router tensor of each layer, from the ops in its build record."""
    routers = {}
    for name, op in record["tensors"].items():
        if op.startswith("RouterWeights("):
            routers[int(op.split("layer=")[1].split(",")[0])] = name
    return routers


class Surgery:
    """What an edit takes from MODEL (tensors, router rows) and what it computes."""

    def __init__(self, model: Path, old: LoadedRecipe, plan: Plan) -> None:
        self.model, self.old, self.plan = model, old, plan
        self.record = read_record(model)
        self.notes: list[str] = []
        if self.record is None:
            self.notes.append(f"{model} has no build record: every tensor is computed again")
        elif self.record["versions"] != versions():
            self.notes.append(f"{model} was built by {self.record['versions']}, this is {versions()}: every tensor "
                              "is computed again")
            self.record = None
        self.previous = ModelFolder.open(model, "MODEL")
        self.stamps = {key: folder_stamp(folder.path) for key, folder in plan.inputs.items()}
        self.by_op = {op: name for name, op in self.record["tensors"].items()} if self.record else {}
        self.execution, self.reused = self._execution()
        self.kept = self._kept_rows()

    def _reusable(self, op, shape: tuple[int, ...], dtype: torch.dtype) -> Optional[str]:
        """MODEL's tensor made by this op from inputs that have not changed since, if any."""
        name = self.by_op.get(repr(op))
        if name is None or isinstance(op, (RouterWeights, SharedGate)):  # made with the routers
            return None
        if any(self.stamps[s.model] != self.record["inputs"].get(s.model) for s in op.sources):
            return None
        info = self.previous.tensors.get(name)
        return name if info is not None and info.shape == shape and info.dtype == dtype else None

    def _execution(self) -> tuple[Plan, int]:
        """The plan with every reusable tensor copied from MODEL, and how many are."""
        tensors, reused = [], 0
        for t in self.plan.tensors:
            name = self._reusable(t.op, t.shape, t.dtype)
            if name is not None:
                t = replace(t, op=Copy(Source(PREVIOUS, name)))
                reused += 1
            tensors.append(t)
        inputs = {**self.plan.inputs, PREVIOUS: self.previous}
        return replace(self.plan, inputs=inputs, tensors=tuple(tensors)), reused

    def _kept_rows(self) -> dict[str, list[torch.Tensor]]:
        """Router rows taken from MODEL, per layer in float32, by expert name. hidden: the rows whose
        inputs are unchanged; trained: every kept expert's row (the start of retraining)."""
        mode = self.plan.recipe.recipe.router.mode
        if self.record is None or mode not in ("hidden", "trained"):
            return {}
        names = self.plan.recipe.recipe.expert_names
        if mode == "hidden":
            keys = row_keys(self.plan)
            names = [n for n in names if self.record["router_rows"].get(n) == keys[n]]
        old_names = self.old.recipe.expert_names
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in names if n in old_names}
        routers = _routers_of(self.record)
        with TensorReader() as reader:
            for layer in sorted(routers):
                weight = reader.read(self.previous.tensors[routers[layer]]).float()
                for name in rows:
                    rows[name].append(weight[old_names.index(name)])
        return rows

    def routers(self, ctx: RouterContext) -> Gates:
        """The edited model's routers: by definition, or from kept rows plus what the edit needs."""
        plan = self.plan
        spec = plan.recipe.recipe.router
        if spec.mode not in ("hidden", "trained") or not self.kept:
            return make_routers(plan, ctx)  # by definition, or nothing to keep: as a build makes them
        names = plan.recipe.recipe.expert_names
        missing = [e for e, n in enumerate(names) if n not in self.kept]
        train = spec.training
        texts = calibration(plan, train.held_out if spec.mode == "trained" else 0.0)
        hidden = int(plan.config["hidden_size"])
        fresh = None
        if missing and (spec.mode == "hidden" or train.init != "zeros"):
            fresh = hidden_rows(plan, texts, spec.pooling or "last", ctx, missing)
        rows = []
        for layer in range(int(plan.config["num_hidden_layers"])):
            rows.append(torch.stack([
                self.kept[n][layer] if n in self.kept
                else fresh[layer][missing.index(e)] if fresh is not None else torch.zeros(hidden)
                for e, n in enumerate(names)]))
        if spec.mode == "hidden":
            return as_gates(plan, rows)
        from mergekit_mode import router_training

        if missing and train.init == "domain":  # new rows get the classifier stage a build gives every row
            rows = router_training.train_domain(plan, texts, rows, ctx)
        objective = router_training.train_domain if train.objective == "domain" else router_training.train_lm
        return as_gates(plan, objective(plan, texts, rows, ctx))

    def summary(self) -> str:
        """One line: what is copied and what is computed."""
        spec = self.plan.recipe.recipe.router
        total = sum(not isinstance(t.op, (RouterWeights, SharedGate)) for t in self.plan.tensors)
        line = f"{self.reused} of {total} tensors copied from {self.model}, {total - self.reused} computed"
        if spec.mode not in ("hidden", "trained"):
            return line + f"; routers ({spec.mode}) from their definition"
        computed = [n for n in self.plan.recipe.recipe.expert_names if n not in self.kept]
        line += f"; router rows taken from {self.model} for {', '.join(self.kept) or 'no expert'}"
        line += f", computed for {', '.join(computed)}" if computed else ""
        return line + (", then all trained" if spec.mode == "trained" else "")


def plan_edit(model: Path, *, drop: Optional[str] = None, replace_: Optional[tuple[str, Path]] = None,
              add: Optional[tuple[str, Path]] = None, data: Optional[Path] = None,
              recipe_dir: Optional[Path] = None) -> tuple[Plan, Edit, Surgery]:
    """The edited recipe's plan, and how to build it from MODEL."""
    old = built_recipe(model, recipe_dir)
    loaded = edited_recipe(old, drop, replace_, add, data)
    try:
        plan = build_plan(loaded)
    except ModeError as e:
        hint = "" if recipe_dir else " (if MODEL's inputs moved, give --recipe-dir)"
        raise ModeError(f"edited recipe: {e}{hint}") from None
    surgery = Surgery(model, old, plan)
    note = None
    if plan.recipe.recipe.router.mode == "trained" and surgery.kept:
        note = ("Routers retrained by `mergekit-mode edit` from a previous build's rows (kept experts) and "
                "`router.train.init` (new experts), not from scratch as a build of this recipe trains them.")
    return plan, Edit(surgery.execution, surgery.routers, note), surgery
