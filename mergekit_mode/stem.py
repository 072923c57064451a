"""Stem merging: the shared tensors of the MoE (attention, norms, embeddings, lm_head) made by one
of mergekit's merge methods instead of copied from the base.

The recipe's `stem:` mirrors a mergekit config (merge_method, base_model, parameters, models with
per-model parameters), and this module leans on mergekit for everything it would otherwise have to
re-implement, so the stem is what `mergekit-yaml` would make of the same dense models:

- methods and their declared parameters come from mergekit's registry
  (`mergekit.merge_methods.registered_methods()`, each method's `spec.parameters` and input
  contract), so every installed method works and recipes are checked against what it declares;
- parameter values go through mergekit's own resolver (`mergekit.parameter_resolver`), so
  gradients (`[0.2, 0.8]` over the layers) and filtered values (`- filter: self_attn`) mean what
  they mean in mergekit, including its layer fraction `t`;
- each tensor is merged by `mergekit.merge_methods.merge_tensors`, mergekit's public entry point
  for "the inputs contributing to one output tensor": it binds the parameters, checks the inputs
  against the method's contract and runs the method's own kernel. Unlike building a
  `MergePlanner` graph, it needs no model folders or loader cache, so the executor can feed it the
  tensors it streamed, one output tensor at a time, on the `--device` it was given.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from mergekit import merge_methods
from mergekit.config import ConditionalParameter, ParameterSetting
from mergekit.merge_methods.base import BasePolicy, MergeMethod, ParameterScope, ParameterSpec
from mergekit.parameter_resolver import resolve_parameters
from pydantic import TypeAdapter, ValidationError

from mergekit_mode.errors import ModeError
from mergekit_mode.ops import Params, StemMerge
from mergekit_mode.recipe import RESERVED_NAME, StemSpec

BASE_MODEL = RESERVED_NAME  # how `stem:` names the recipe's base model

_SETTING = TypeAdapter(ParameterSetting)


@dataclass(frozen=True)
class Stem:
    """A checked `stem:` merge: which models go in, in mergekit's order, and their settings."""

    method: str
    inputs: tuple[str, ...]  # listed models, then the base if not listed (as mergekit orders them)
    base: Optional[str]
    shared: Mapping[str, Any]  # stem.parameters
    per_model: Mapping[str, Mapping[str, Any]]  # stem.models[i].parameters by model name
    seed: int

    def parameters(self, tensor: str, t: float) -> tuple[Params, tuple[Params, ...]]:
        """The method's parameters for one tensor, resolved by mergekit: shared ones, then each
        input's. `t` is mergekit's layer fraction (layer / (layers - 1); 0 outside layers)."""
        try:
            shared, per_input = resolve_parameters(
                merge_methods.get(self.method).spec,
                tensor_name=tensor,
                inputs={model: tensor for model in self.inputs},
                sources=lambda model: (self.per_model.get(model), self.shared) if model else (self.shared,),
                base_model=self.base,
                t=t,
            )
        except (RuntimeError, ValueError) as e:  # e.g. a filtered value that no filter gives this tensor
            raise ModeError(f"stem.parameters: {e}") from None
        return tuple(shared.items()), tuple(tuple(per_input[model].items()) for model in self.inputs)


def _method(name: str) -> MergeMethod:
    methods = {m.spec.name: m for m in merge_methods.registered_methods()}
    if name not in methods:
        raise ModeError(f"stem.merge_method: unknown merge method {name!r} (available: {', '.join(sorted(methods))})")
    return methods[name]


def _leaves(setting: Any) -> list[Any]:
    """The scalars of a mergekit parameter setting (a scalar, a gradient, filtered values)."""
    if isinstance(setting, ConditionalParameter):
        return _leaves(setting.value)
    if isinstance(setting, list):
        return [leaf for item in setting for leaf in _leaves(item)]
    return [setting]


def _parse_values(
    values: Mapping[str, Any], known: Mapping[str, ParameterSpec], method: str, field: str
) -> dict[str, Any]:
    """Parameter values as mergekit's resolver takes them (a scalar, a gradient or filtered values),
    each scalar checked against the type the method declares."""
    parsed = {}
    for name, value in values.items():
        if name not in known:
            raise ModeError(f"{field}.{name}: unknown parameter of {method} (known: {', '.join(known) or 'none'})")
        try:
            parsed[name] = _SETTING.validate_python(value)
            for leaf in _leaves(parsed[name]):
                known[name].validate(leaf)
        except ValidationError as e:
            raise ModeError(f"{field}.{name}: {e.errors()[0]['msg']}") from None
    return parsed


def _check_names(spec: StemSpec, experts: list[str]) -> list[str]:
    """The listed models (default: every expert), each an expert or the base, none twice."""
    known = f"(experts: {', '.join(experts)}; or {BASE_MODEL})"
    if spec.base_model is not None and spec.base_model not in (*experts, BASE_MODEL):
        raise ModeError(f"stem.base_model: unknown model {spec.base_model!r} {known}")
    if spec.models is None:
        return list(experts)
    names: list[str] = []
    for i, entry in enumerate(spec.models):
        if entry.model not in (*experts, BASE_MODEL):
            raise ModeError(f"stem.models[{i}].model: unknown model {entry.model!r} {known}")
        if entry.model in names:
            raise ModeError(f"stem.models[{i}].model: {entry.model!r} is listed twice")
        names.append(entry.model)
    return names


def resolve_stem(spec: Optional[StemSpec], experts: list[str]) -> Optional[Stem]:
    """Check a recipe's `stem:` against mergekit's registry; None for `stem: base` (copy the base).

    Errors name the field: unknown method (listing the available ones), unknown model, unknown or
    ill-typed parameter (listing the method's parameters), missing required parameter, inputs the
    method's contract refuses (e.g. slerp takes exactly two).
    """
    if spec is None:
        return None
    method = _method(spec.merge_method)
    name, contract = method.spec.name, method.spec.contract
    listed = _check_names(spec, experts)
    base = spec.base_model
    if base is None and contract.base == BasePolicy.REQUIRED:
        base = BASE_MODEL
    if base is not None and contract.base == BasePolicy.FORBIDDEN:
        raise ModeError(f"stem.base_model: {name} takes no base model")
    inputs = tuple(listed + ([base] if base is not None and base not in listed else []))
    try:
        method.validate_inputs(inputs, base)
    except ValueError as e:
        raise ModeError(f"stem.models: {name}: {e} ({', '.join(inputs)})") from None

    known = {p.name: p for p in method.spec.parameters}
    shared = _parse_values(spec.parameters, known, name, "stem.parameters")
    per_model = {}
    for i, entry in enumerate(spec.models or ()):
        field = f"stem.models[{i}].parameters"
        per_model[entry.model] = _parse_values(entry.parameters, known, name, field)
        for key in entry.parameters:
            if known[key].scope == ParameterScope.SHARED:
                raise ModeError(f"{field}.{key}: {key} is shared by all models of {name}; set it in stem.parameters")
            if known[key].scope == ParameterScope.NON_BASE and entry.model == base:
                raise ModeError(f"{field}.{key}: the base model takes no {key} in {name}")

    for p in method.spec.parameters:
        if not p.required or p.name in shared:
            continue
        if p.scope == ParameterScope.SHARED:
            raise ModeError(f"stem.parameters: missing {p.name}, required by {name}")
        for model in inputs:
            if p.name not in per_model.get(model, {}) and (p.scope == ParameterScope.INPUT or model != base):
                where = (f"stem.models[{listed.index(model)}].parameters" if spec.models is not None and model in listed
                         else "stem.parameters")
                raise ModeError(f"{where}: missing {p.name} (for {model}), required by {name}")
    return Stem(name, inputs, base, shared, per_model, spec.seed)


def merge(op: StemMerge, name: str, tensors: list[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """One stem tensor by mergekit's own kernel, computed in float32 on the inputs' device.

    Randomized methods (DARE, DELLA) draw from a generator seeded by the recipe's stem.seed and the
    tensor's name, inside a forked RNG: the same recipe gives the same bytes whatever the order
    of work, and the process's global RNG is left as it was.
    """
    ids = list(op.models)
    parameters: dict[str, Any] = dict(op.parameters)
    for model, values in zip(ids, op.input_parameters):
        for key, value in values:
            parameters.setdefault(key, {})[model] = value
    device = tensors[0].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(zlib.crc32(f"{op.seed}:{name}".encode()))  # the CPU generator keeps 32 bits
        return merge_methods.merge_tensors(
            tensors, op.method, parameters=parameters, ids=ids, base_index=op.base_index, name=name,
            dtype=torch.float32, out_dtype=out_dtype,
        )
