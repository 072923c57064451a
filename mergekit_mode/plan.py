"""The plan: every output tensor, its shape and dtype, and where it comes from, as plain data.

Built from the recipe and the inputs' headers alone, so `--dry-run`, `validate` and most tests
run without reading a weight. Its order is the order of work: the executor computes and the
writer writes tensors exactly in plan order, one layer's tensors at a time, which is what keeps
memory flat however many layers the model has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from mergekit_mode.errors import ModeError
from mergekit_mode.formats import mixtral
from mergekit_mode.inputs import DTYPE_TAGS, ModelFolder, TensorInfo
from mergekit_mode.recipe import DATA_MODES, LoadedRecipe
from mergekit_mode.stem import BASE_MODEL, Params, Stem, resolve_stem

BASE = BASE_MODEL  # the key of the recipe's base among the inputs; no expert may take this name


@dataclass(frozen=True)
class Source:
    """A tensor of an input: `model` is BASE or an expert's name."""

    model: str
    tensor: str

    def __str__(self) -> str:
        return f"{self.model}:{self.tensor}"


@dataclass(frozen=True)
class Copy:
    """The output is the source tensor, cast to the output dtype."""

    source: Source

    @property
    def sources(self) -> tuple[Source, ...]:
        return (self.source,)

    def __str__(self) -> str:
        return f"copy {self.source}"


@dataclass(frozen=True)
class RouterWeights:
    """The output is the router of `layer`, made by the recipe's router mode."""

    layer: int
    mode: str

    sources: tuple[Source, ...] = ()  # computed before the write pass, reads nothing here

    def __str__(self) -> str:
        return f"router {self.mode} (layer {self.layer})"


@dataclass(frozen=True)
class StemMerge:
    """The output is mergekit's `method` applied to the same tensor of each source (stem merging).

    Parameters are resolved for this tensor at plan time: `parameters` are the method's shared
    ones, `input_parameters[i]` those of `sources[i]`; `sources[base_index]` is the method's base.
    """

    method: str
    sources: tuple[Source, ...]
    base_index: Optional[int]
    parameters: Params
    input_parameters: tuple[Params, ...]
    seed: int

    def __str__(self) -> str:
        def fmt(params: Params) -> str:
            return " ".join(f"{k}={v}" for k, v in params)

        inputs = [f"{s.model}{'*' if i == self.base_index else ''}" + (f"[{fmt(p)}]" if p else "")
                  for i, (s, p) in enumerate(zip(self.sources, self.input_parameters))]
        return f"{self.method}({', '.join(inputs)}{'; ' + fmt(self.parameters) if self.parameters else ''})"


def stem_merge(stem: Stem, tensor: str, t: float) -> StemMerge:
    """The StemMerge of one shared tensor; `t` is mergekit's layer fraction for gradients."""
    shared, per_input = stem.parameters(tensor, t)
    base_index = stem.inputs.index(stem.base) if stem.base is not None else None
    return StemMerge(stem.method, tuple(Source(m, tensor) for m in stem.inputs), base_index, shared, per_input, stem.seed)


Op = Union[Copy, RouterWeights, StemMerge]


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
class Plan:
    recipe: LoadedRecipe
    inputs: dict[str, ModelFolder]  # BASE and each expert's name
    config: dict  # the output's config.json
    dtype: torch.dtype
    tensors: tuple[OutputTensor, ...]
    warnings: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def reads(self) -> list[TensorInfo]:
        """Every input tensor the plan reads, in the order the executor asks for them."""
        return [self.inputs[s.model].tensors[s.tensor] for t in self.tensors for s in t.op.sources]

    def describe(self) -> str:
        """The plan as text: one line per output tensor, then a summary (what --dry-run prints)."""
        width = max(len(t.name) for t in self.tensors)
        lines = [
            f"{t.name:<{width}}  {str(list(t.shape)):<16} {DTYPE_TAGS[t.dtype]:<5} <- {t.op}" for t in self.tensors
        ]
        folders = [f"  {key}: {folder.path}" for key, folder in self.inputs.items()]
        lines += [
            "",
            f"inputs:\n" + "\n".join(folders),
            f"output: {mixtral.ARCHITECTURE}, {self.config['num_local_experts']} experts, "
            f"{self.config['num_experts_per_tok']} per token, {len(self.tensors)} tensors, "
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


def open_inputs(loaded: LoadedRecipe) -> dict[str, ModelFolder]:
    """Open the base and every expert folder (headers only) and check they fit together."""
    recipe = loaded.recipe
    base = ModelFolder.open(loaded.resolve(recipe.base_model), "base_model")
    mixtral.check_base_config(base.config, "base_model")
    inputs = {BASE: base}
    for i, (spec, name) in enumerate(zip(recipe.experts, recipe.expert_names)):
        field = f"experts[{i}].model"
        expert = ModelFolder.open(loaded.resolve(spec.model), field)
        if expert.model_type != base.model_type:
            raise ModeError(f"{field}: model_type {expert.model_type!r} differs from the base's {base.model_type!r}")
        for key in _SHAPE_KEYS:
            if expert.config.get(key) != base.config.get(key):
                raise ModeError(f"{field}: {key} is {expert.config.get(key)}, the base's is {base.config.get(key)}")
        inputs[name] = expert
    _check_data_files(loaded)
    return inputs


def _check_data_files(loaded: LoadedRecipe) -> None:
    """Router data files must exist before a run starts (`validate` reports them, not a late failure)."""
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
        raise ModeError(f"{field}: tensor {name} has shape {list(info.shape)}, the base's is {list(shape)}")
    if not info.dtype.is_floating_point:
        raise ModeError(f"{field}: tensor {name} is {DTYPE_TAGS[info.dtype]}, not a float")
    return info


def _output_dtype(loaded: LoadedRecipe, base: ModelFolder) -> torch.dtype:
    if loaded.recipe.dtype:
        return _DTYPES[loaded.recipe.dtype]
    embed = base.tensors.get(mixtral.EMBED)
    return embed.dtype if embed is not None and embed.dtype in _DTYPES.values() else torch.float32


def build_plan(loaded: LoadedRecipe) -> Plan:
    recipe = loaded.recipe
    inputs = open_inputs(loaded)
    base = inputs[BASE]
    names = recipe.expert_names
    fields = {name: f"experts[{i}].model" for i, name in enumerate(names)}
    dtype = _output_dtype(loaded, base)
    cfg = base.config
    num_layers = int(cfg["num_hidden_layers"])
    hidden = int(cfg["hidden_size"])
    tied = bool(cfg.get("tie_word_embeddings", False))

    used: set[str] = set()
    stem = resolve_stem(recipe.stem, names)
    fields[BASE] = "base_model"

    def from_base(name: str, t: float = 0.0) -> OutputTensor:
        """A shared tensor: the base's, or with `stem:` merged from the stem's models."""
        info = _tensor(base, name, "base_model")
        used.add(name)
        if stem is None:
            return OutputTensor(name, info.shape, dtype, Copy(Source(BASE, name)))
        op = stem_merge(stem, name, t)
        for source in op.sources:
            _tensor(inputs[source.model], name, fields[source.model], info.shape)
        return OutputTensor(name, info.shape, dtype, op)

    tensors = [from_base(mixtral.EMBED)]
    for layer in range(num_layers):
        prefix = mixtral.layer_prefix(layer)
        t = layer / (num_layers - 1) if num_layers > 1 else 1.0  # mergekit's layer fraction
        tensors += [from_base(prefix + suffix, t) for suffix in mixtral.LAYER_SHARED]
        for e, name in enumerate(names):
            for proj, mlp in mixtral.EXPERT_FROM_MLP.items():
                shape = _tensor(base, prefix + mlp, "base_model").shape
                _tensor(inputs[name], prefix + mlp, fields[name], shape)
                used.add(prefix + mlp)
                tensors.append(
                    OutputTensor(mixtral.expert_tensor(layer, e, proj), shape, dtype, Copy(Source(name, prefix + mlp)))
                )
        tensors.append(
            OutputTensor(mixtral.router_tensor(layer), (len(names), hidden), dtype,
                         RouterWeights(layer, recipe.router.mode))
        )
    tensors.append(from_base(mixtral.FINAL_NORM))
    if not tied:
        tensors.append(from_base(mixtral.LM_HEAD))
    elif mixtral.LM_HEAD in base.tensors:
        used.add(mixtral.LM_HEAD)  # tied: the runtime reuses the embeddings

    leftover = sorted(n for n in base.tensors if n not in used and not n.endswith(mixtral.IGNORABLE_SUFFIXES))
    if leftover:
        raise ModeError(
            f"base_model: tensor {leftover[0]} has no place in a Mixtral checkpoint"
            + (f" (and {len(leftover) - 1} more)" if len(leftover) > 1 else "")
        )
    warnings = []
    k = recipe.router.experts_per_token
    if recipe.router.mode == "gateless" and k is not None and k != len(names):
        warnings.append(f"router.experts_per_token: {k} is ignored by gateless, which uses all {len(names)} experts")
    if recipe.router.mode not in DATA_MODES and any(e.has_data for e in recipe.experts):
        warnings.append(f"experts' data/prompts are not used by router.mode {recipe.router.mode} "
                        f"(only by {' and '.join(DATA_MODES)})")
    config = mixtral.build_config(cfg, len(names), recipe.top_k, str(dtype).removeprefix("torch."))
    return Plan(loaded, inputs, config, dtype, tuple(tensors), tuple(warnings))
