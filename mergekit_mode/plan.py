"""The plan: every output tensor, its shape and dtype, and where it comes from, as plain data.

Built from the recipe and the inputs' headers alone, so `--dry-run`, `validate` and most tests
run without reading a weight. Its order is the order of work: the executor computes and the
writer writes tensors exactly in plan order, one layer's tensors at a time, which is what keeps
memory flat however many layers the model has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import torch

from mergekit_mode.adapters import AdapterFolder
from mergekit_mode.check import missing_data
from mergekit_mode.errors import ModeError
from mergekit_mode.experts import (Expert, Input, adapter_warnings, check_tied_lm_head, embedding_op, experts_of,
                                   model_key, shared_op, stem_op)
from mergekit_mode.formats import FORMATS, OutputFormat, for_base, families
from mergekit_mode.formats.base import SharedExpert, rope_theta
from mergekit_mode.formats.families import BaseFamily, Role
from mergekit_mode.inputs import DTYPE_TAGS, TOKENIZER_FILES, ModelFolder, TensorInfo
from mergekit_mode.ops import BASE, Copy, Op, RouterWeights, SharedGate, Source, Zeros
from mergekit_mode.recipe import DATA_MODES, FromExpert, LoadedRecipe, Recipe
from mergekit_mode.tokenizer_audit import Carried, audit

if TYPE_CHECKING:  # mergekit (stem merges) is imported only by recipes that merge the stem
    from mergekit_mode.stem import Stem

@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    op: Op

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Gates:
    """What the RouterWeights and SharedGate ops write, made before the write pass (routers.py):
    per layer the router [experts, hidden] and, in formats with a shared expert, its gate [1, hidden]."""

    routers: list[torch.Tensor]
    shared: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    recipe: LoadedRecipe
    inputs: dict[str, Input]  # BASE, expert names, model_key(name) for an adapter's fine-tune
    family: BaseFamily  # the base's
    format: OutputFormat  # the output's
    config: dict  # the output's config.json
    dtype: torch.dtype
    tensors: tuple[OutputTensor, ...]
    warnings: tuple[str, ...] = ()
    shared: Optional[SharedExpert] = None  # the shared expert, in formats that have one
    carried: Carried | None = None  # tokenizer, chat template, generation config (tokenizer_audit)

    @property
    def num_experts(self) -> int:
        return len(self.recipe.recipe.experts)

    @property
    def top_k(self) -> int:
        return self.recipe.recipe.top_k

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def info(self, source: Source) -> TensorInfo:
        """Where an op's source tensor lives."""
        return self.inputs[source.model].tensors[source.tensor]

    def reads(self) -> list[TensorInfo]:
        """Every input tensor the plan reads, in the order the executor asks for them."""
        return [self.info(s) for t in self.tensors for s in t.op.sources]

    def describe(self) -> str:
        """The plan as text: one line per output tensor, then a summary (what --dry-run prints)."""
        width = max(len(t.name) for t in self.tensors)
        lines = [
            f"{t.name:<{width}}  {str(list(t.shape)):<16} {DTYPE_TAGS[t.dtype]:<5} <- {t.op}" for t in self.tensors
        ]
        folders = [f"  {key}: {folder.path}" for key, folder in self.inputs.items()]
        lines += [
            "",
            "inputs:\n" + "\n".join(folders),
            f"output: {self.format.architecture} (output.architecture {self.format.name}), {self.num_experts} "
            f"experts, {self.top_k} per token, {len(self.tensors)} tensors, "
            f"{format_bytes(self.total_bytes)} ({self.total_bytes} bytes), dtype {DTYPE_TAGS[self.dtype]}",
        ]
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.2f} TB"


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Config keys that must agree between the base and every expert for an MLP to be swappable.
_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size",
               "num_attention_heads", "num_key_value_heads")


def open_inputs(loaded: LoadedRecipe) -> tuple[dict[str, Input], dict[str, str], BaseFamily, OutputFormat]:
    """Open the base and every expert folder (headers only) and check each fits the base, and the
    output format fits the base's family.

    Returns the inputs by key (BASE, expert names, model_key(name) for adapters' fine-tunes), the
    recipe field each key came from (for error messages), the base's family and the format."""
    recipe = loaded.recipe
    base = ModelFolder.open_to_load(loaded.resolve(recipe.base_model), "base_model")  # its tokenizer is
    family = families.family_of(base.config, "base_model")  # copied into the output and loaded
    fmt = for_base(family, recipe.output.architecture)
    family.check(base.config, "base_model")
    inputs: dict[str, Input] = {BASE: base}
    fields = {BASE: "base_model"}
    for i, (spec, name) in enumerate(zip(recipe.experts, recipe.expert_names)):
        if spec.model is not None:
            key = model_key(name) if spec.adapter is not None else name
            fields[key] = f"experts[{i}].model"
            inputs[key] = _open_model(loaded.resolve(spec.model), fields[key], base)
        if spec.adapter is not None:
            fields[name] = f"experts[{i}].adapter"
            inputs[name] = AdapterFolder.open(loaded.resolve(spec.adapter), fields[name])
    _check_data_files(loaded)
    return inputs, fields, family, fmt


def _open_model(path: Path, field: str, base: ModelFolder) -> ModelFolder:
    expert = ModelFolder.open(path, field)
    if expert.model_type != base.model_type:
        raise ModeError(f"{field}: model_type {expert.model_type!r} differs from the base's {base.model_type!r}")
    for key in _SHAPE_KEYS:
        if expert.config.get(key) != base.config.get(key):
            raise ModeError(f"{field}: {key} is {expert.config.get(key)}, the base's is {base.config.get(key)}")
    return expert


def _check_data_files(loaded: LoadedRecipe) -> None:
    """Router and check data files must exist before a run starts (`validate` reports them, not a late failure)."""
    missing_data(loaded)
    if loaded.recipe.router.mode not in DATA_MODES:
        return
    for i, spec in enumerate(loaded.recipe.experts):
        if spec.data is not None and not loaded.resolve(spec.data).is_file():
            raise ModeError(f"experts[{i}].data: {loaded.resolve(spec.data)} does not exist")



def _tensor(folder: ModelFolder, name: str, field: str, shape: tuple[int, ...] | None = None):
    info = folder.tensors.get(name)
    if info is None:
        raise ModeError(f"{field}: {folder.path} lacks tensor {name}")
    if shape is not None and info.shape != shape:
        raise ModeError(f"{field}: tensor {name} has shape {list(info.shape)}, expected {list(shape)}")
    if not info.dtype.is_floating_point:
        raise ModeError(f"{field}: tensor {name} is {DTYPE_TAGS[info.dtype]}, not a float")
    return info


def _output_dtype(loaded: LoadedRecipe, base: ModelFolder) -> torch.dtype:
    if loaded.recipe.dtype:
        return _DTYPES[loaded.recipe.dtype]
    embed = base.tensors.get(families.EMBED.name)
    return embed.dtype if embed is not None and embed.dtype in _DTYPES.values() else torch.float32


def _warnings(
    loaded: LoadedRecipe, inputs: dict[str, Input], experts: dict[str, Expert], fields: dict[str, str],
    stem: Stem | None, family: BaseFamily, fmt: OutputFormat,
) -> Iterator[str]:
    recipe = loaded.recipe
    k = recipe.router.experts_per_token
    n = len(experts)
    if recipe.router.mode == "gateless" and k is not None and k != n:
        yield f"router.experts_per_token: {k} is ignored by gateless, which uses all {n} experts"
    if not fmt.renormalise and recipe.top_k < n:
        yield (f"router.experts_per_token: {fmt.name} does not rescale the chosen experts' weights to sum to 1, so "
               f"with {recipe.top_k} of {n} experts per token they sum to less (docs/formats.md)")
    if recipe.router.mode not in DATA_MODES and any(e.has_data for e in recipe.experts):
        yield (f"experts' data/prompts are not used by router.mode {recipe.router.mode} "
               f"(only by {' and '.join(DATA_MODES)})")
    yield from adapter_warnings(inputs, experts, fields, recipe, stem.inputs if stem else None, family)
    yield from _model_warnings(inputs, fields)


def _shared_expert(recipe: Recipe, fmt: OutputFormat, cfg: dict) -> SharedExpert | None:
    """The shared expert the format has, sized by the recipe's choice: a real MLP is the base's
    size; an unused one (all zeros) is as small as runtimes take, so it costs next to nothing."""
    policy = recipe.shared_expert
    if fmt.shared_expert is None:
        if policy not in (None, "none"):
            raise ModeError(f"shared_expert: {fmt.name} has no shared expert (formats with one: "
                            f"{', '.join(f.name for f in FORMATS if f.shared_expert) or 'none'})")
        return None
    inter = int(cfg["intermediate_size"])
    return SharedExpert(inter if policy not in (None, "none") else min(fmt.empty_shared_expert_size, inter))


def _model_warnings(inputs: dict[str, Input], fields: dict[str, str]) -> Iterator[str]:
    """What the output takes from the base alone and an expert may disagree with: rope_theta and
    hidden_act (the output has one of each; an expert trained with others fits less). Tokenizers are
    compared token by token by tokenizer_audit."""
    base = inputs[BASE]
    assert isinstance(base, ModelFolder)
    if not any((base.path / name).is_file() for name in TOKENIZER_FILES):
        yield f"base_model: {base.path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); the output will have none"
    for key, folder in inputs.items():
        if key == BASE or not isinstance(folder, ModelFolder):
            continue
        for what, value in (("rope_theta", rope_theta), ("hidden_act", _hidden_act)):
            if value(folder.config) != value(base.config):
                yield (f"{fields[key]}: {what} is {value(folder.config)}, the base's is {value(base.config)}; the "
                       "output uses the base's")


def _hidden_act(config: dict) -> str:
    return str(config.get("hidden_act", "silu"))


def _resolve_stem(recipe, names: list[str]) -> Stem | None:
    if recipe.stem is None:
        return None
    from mergekit_mode.stem import resolve_stem

    return resolve_stem(recipe.stem, names)


def build_plan(loaded: LoadedRecipe) -> Plan:
    recipe = loaded.recipe
    inputs, fields, family, fmt = open_inputs(loaded)
    base = inputs[BASE]
    experts = experts_of(loaded, inputs, fields)
    names = recipe.expert_names
    adapters = sum(e.adapter is not None for e in experts.values())
    dtype = _output_dtype(loaded, base)
    cfg = base.config
    num_layers = int(cfg["num_hidden_layers"])
    hidden = int(cfg["hidden_size"])
    tied = bool(cfg.get("tie_word_embeddings", False))

    used: set[str] = set()
    stem = _resolve_stem(recipe, names)

    def output(name: str, tensor: str, row: families.Tensor, op: Op) -> OutputTensor:
        """`name` in the output, made by `op` from the base tensor `tensor` (or its versions)."""
        shape = _tensor(base, tensor, "base_model", families.shape(row, cfg)).shape
        for src in op.sources:  # model tensors; adapters' were checked against them when opened
            folder = inputs[src.model]
            if isinstance(folder, ModelFolder):
                _tensor(folder, src.tensor, fields[src.model], shape)
        used.add(tensor)
        return OutputTensor(name, shape, dtype, op)

    def shared(tensor: str, row: families.Tensor, t: float = 0.0) -> OutputTensor:
        """Attention and norms: merged by `stem:`, or the base's with the shared_deltas policy."""
        if stem is not None:
            return output(tensor, tensor, row, stem_op(stem, tensor, t, experts))
        return output(tensor, tensor, row, shared_op(tensor, experts, recipe.shared_deltas, adapters))

    def embedding(row: families.Tensor) -> OutputTensor:
        """embed_tokens and lm_head: merged by `stem:`, or by the embeddings policy."""
        tensor = row.name
        if stem is not None:
            return output(tensor, tensor, row, stem_op(stem, tensor, 0.0, experts))
        return output(tensor, tensor, row, embedding_op(tensor, experts, recipe.embeddings, fields))

    def shared_expert(layer: int) -> list[OutputTensor]:
        """The shared expert's MLP, by the recipe's shared_expert policy, and its gate."""
        assert shared_spec is not None
        policy = recipe.shared_expert
        rows = []
        for role in fmt.experts:
            row = family.mlp(role)
            name, source = fmt.shared_expert_tensor(layer, role), family.layer_name(layer, row)
            if isinstance(policy, FromExpert):
                rows.append(output(name, source, row, experts[policy.from_].op(source)))
            elif policy == "base":
                rows.append(output(name, source, row, Copy(Source(BASE, source))))
            else:
                sized = {**cfg, "intermediate_size": shared_spec.intermediate_size}
                rows.append(OutputTensor(name, families.shape(row, sized), dtype, Zeros()))
        return rows + [OutputTensor(fmt.shared_gate_tensor(layer), (1, hidden), dtype, SharedGate(layer))]

    shared_spec = _shared_expert(recipe, fmt, cfg)
    mlp = {role: family.mlp(role) for role in fmt.experts}
    tensors = [embedding(families.EMBED)]
    for layer in range(num_layers):
        t = layer / (num_layers - 1) if num_layers > 1 else 1.0  # mergekit's layer fraction
        tensors += [shared(family.layer_name(layer, row), row, t) for row in family.layer
                    if row.role in (Role.ATTENTION, Role.NORM)]
        for e, name in enumerate(names):
            for role, row in mlp.items():
                source = family.layer_name(layer, row)
                tensors.append(output(fmt.expert_tensor(layer, e, role), source, row, experts[name].op(source)))
        if shared_spec is not None:
            tensors += shared_expert(layer)
        tensors.append(
            OutputTensor(fmt.router_tensor(layer), (len(names), hidden), dtype, RouterWeights(layer, recipe.router.mode))
        )
    tensors.append(shared(families.FINAL_NORM.name, families.FINAL_NORM))
    if not tied:
        tensors.append(embedding(families.LM_HEAD))
    else:
        used.add(families.LM_HEAD.name)  # tied: the runtime reuses the embeddings
        check_tied_lm_head(experts, recipe.embeddings, fields, stem.inputs if stem else None)
        if not fmt.ties_embeddings:  # the format needs an lm_head of its own: the embeddings' copy
            lm_head = embedding(families.EMBED)
            tensors.append(OutputTensor(families.LM_HEAD.name, lm_head.shape, dtype, lm_head.op))

    leftover = sorted(n for n in base.tensors if n not in used and not n.endswith(families.IGNORABLE_SUFFIXES))
    if leftover:
        raise ModeError(
            f"base_model: tensor {leftover[0]} has no place in a {fmt.title} checkpoint"
            + (f" (and {len(leftover) - 1} more)" if len(leftover) > 1 else "")
        )
    config = fmt.build_config(cfg, len(names), recipe.top_k, str(dtype).removeprefix("torch."), shared_spec)
    carried, carried_warnings = audit(loaded, base.path)
    warnings = tuple(_warnings(loaded, inputs, experts, fields, stem, family, fmt)) + tuple(carried_warnings)
    return Plan(loaded, inputs, family, fmt, config, dtype, tuple(tensors), warnings, shared_spec, carried)
