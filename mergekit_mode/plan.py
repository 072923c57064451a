"""The plan: every output tensor, its shape and dtype, and where it comes from, as plain data.

Built from the recipe and the inputs' headers alone, so `--dry-run`, `validate` and most tests
run without reading a weight. Its order is the order of work: the executor computes and the
writer writes tensors exactly in plan order, one layer's tensors at a time, which is what keeps
memory flat however many layers the model has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import torch

from mergekit_mode.adapters import CONFIG_FILE, AdapterFolder, check_biases, recorded_base_differs
from mergekit_mode.errors import ModeError
from mergekit_mode.formats import mixtral
from mergekit_mode.inputs import DTYPE_TAGS, ModelFolder, TensorReader
from mergekit_mode.recipe import FromExpert, LoadedRecipe, Recipe

BASE = "base"


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

    def __str__(self) -> str:
        return f"copy {self.source}"


@dataclass(frozen=True)
class RouterWeights:
    """The output is the router of `layer`, made by the recipe's router mode."""

    layer: int
    mode: str

    def __str__(self) -> str:
        return f"router {self.mode} (layer {self.layer})"


@dataclass(frozen=True)
class LoraMerge:
    """The output is `base` with an expert's LoRA merged in (adapters.merge_lora), in float32."""

    base: Source
    lora_A: Source
    lora_B: Source
    scale: float
    transpose: bool  # embedding layers: peft merges (B @ A).T
    magnitude: Source | None = None  # DoRA

    def __str__(self) -> str:
        dora = ", dora" if self.magnitude else ""
        return f"{self.base} + lora {self.lora_A.model} (scale {self.scale:g}{dora})"


@dataclass(frozen=True)
class Change:
    """What one expert's adapter does to a tensor: `new` minus the weights `old` it was applied to."""

    expert: str
    new: Union[LoraMerge, Copy]
    old: Source


@dataclass(frozen=True)
class Mean:
    """The output is `base` plus the sum of the changes divided by `count`: the mean change over
    `count` experts, those not listed counting as a zero change (the `average` shared-delta policy)."""

    base: Source
    changes: tuple[Change, ...]
    count: int

    def __str__(self) -> str:
        terms = " + ".join(f"Δ{c.expert}" for c in self.changes)
        return f"{self.base} + ({terms}) / {self.count}"


Op = Union[Copy, RouterWeights, LoraMerge, Mean]


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
    inputs: dict[str, Union[ModelFolder, AdapterFolder]]  # BASE, expert names, model_key(name)
    config: dict  # the output's config.json
    dtype: torch.dtype
    tensors: tuple[OutputTensor, ...]
    warnings: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

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


def model_key(name: str) -> str:
    """Input key of the fine-tune an adapter expert is applied to (the adapter's own key is `name`)."""
    return f"{name}.model"


Input = Union[ModelFolder, AdapterFolder]


def open_inputs(loaded: LoadedRecipe) -> tuple[dict[str, Input], dict[str, str]]:
    """Open the base and every expert folder (headers only) and check each fits the base.

    Returns the inputs by key (BASE, expert names, model_key(name) for adapters' fine-tunes) and the
    recipe field each key came from, for error messages."""
    recipe = loaded.recipe
    base = ModelFolder.open(loaded.resolve(recipe.base_model), "base_model")
    mixtral.check_base_config(base.config, "base_model")
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
    return inputs, fields


def _open_model(path: Path, field: str, base: ModelFolder) -> ModelFolder:
    expert = ModelFolder.open(path, field)
    if expert.model_type != base.model_type:
        raise ModeError(f"{field}: model_type {expert.model_type!r} differs from the base's {base.model_type!r}")
    for key in _SHAPE_KEYS:
        if expert.config.get(key) != base.config.get(key):
            raise ModeError(f"{field}: {key} is {expert.config.get(key)}, the base's is {base.config.get(key)}")
    return expert


@dataclass(frozen=True)
class _Expert:
    """Where one expert's version of each base tensor comes from."""

    name: str
    stem: str  # input key of the weights it starts from: its fine-tune, or BASE for a lone adapter
    adapter: AdapterFolder | None

    def op(self, tensor: str) -> Union[LoraMerge, Copy]:
        lora = self.adapter.modules.get(tensor) if self.adapter else None
        if lora is not None:
            magnitude = Source(self.name, lora.magnitude.name) if lora.magnitude else None
            return LoraMerge(Source(self.stem, tensor), Source(self.name, lora.lora_A.name),
                             Source(self.name, lora.lora_B.name), lora.scale, lora.transpose, magnitude)
        if self.adapter is not None and tensor in self.adapter.saved:
            return Copy(Source(self.name, self.adapter.saved[tensor].name))
        return Copy(Source(self.stem, tensor))

    def change(self, tensor: str) -> Change | None:
        """What the adapter does to `tensor`; None when nothing (always, for a full fine-tune)."""
        new, old = self.op(tensor), Source(self.stem, tensor)
        return None if new == Copy(old) else Change(self.name, new, old)


def _experts(loaded: LoadedRecipe, inputs: dict[str, Input], fields: dict[str, str]) -> dict[str, _Expert]:
    """Each expert's stem and adapter; adapters checked against the weights they apply to."""
    experts = {}
    for spec, name in zip(loaded.recipe.experts, loaded.recipe.expert_names):
        adapter = inputs[name] if spec.adapter is not None else None
        stem = (model_key(name) if spec.model is not None else BASE) if adapter else name
        if isinstance(adapter, AdapterFolder):
            _check_adapter(adapter, inputs[stem], fields[name])
        experts[name] = _Expert(name, stem, adapter)
    return experts


def _check_adapter(adapter: AdapterFolder, stem: Input, field: str) -> None:
    assert isinstance(stem, ModelFolder)
    for lora in adapter.modules.values():
        info = stem.tensors.get(lora.weight)
        if info is None:
            raise ModeError(f"{field}: LoRA on {lora.weight.removesuffix('.weight')}, which {stem.path} lacks")
        if info.shape != lora.expected_weight_shape():
            raise ModeError(f"{field}: LoRA on {lora.weight.removesuffix('.weight')} fits a weight of shape "
                            f"{list(lora.expected_weight_shape())}, {stem.path} has {list(info.shape)}")
    for name, saved in adapter.saved.items():
        info = stem.tensors.get(name)
        if info is None or info.shape != saved.shape:
            have = f"has shape {list(info.shape)}" if info else "lacks it"
            raise ModeError(f"{field}: saves {name} with shape {list(saved.shape)} (modules_to_save); {stem.path} {have}")
    with TensorReader() as reader:
        check_biases(adapter, reader, field)


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


def _shared(tensor: str, experts: dict[str, _Expert], policy: object, adapters: int) -> Op:
    """A tensor Mixtral shares between experts (attention, norms), by the shared_deltas policy."""
    if isinstance(policy, FromExpert):
        return experts[policy.from_].op(tensor)
    changes = tuple(c for e in experts.values() if (c := e.change(tensor)) is not None)
    if policy == "drop" or not changes:
        return Copy(Source(BASE, tensor))
    return Mean(Source(BASE, tensor), changes, adapters)


def _refuse_unpoliced(tensor: str, experts: dict[str, _Expert], policy: object, fields: dict[str, str]) -> None:
    """embed_tokens / lm_head are shared too, and no average makes sense for them, so an adapter
    that changes them needs an explicit `embeddings` policy."""
    if policy is not None:
        return
    for name, expert in experts.items():
        if expert.change(tensor) is not None:
            raise ModeError(f"{fields[name]}: changes {tensor} (LoRA target or modules_to_save), which Mixtral "
                            f"experts share: set `embeddings: base` or `embeddings: {{from: {name}}}`")


def _embedding(tensor: str, experts: dict[str, _Expert], policy: object, fields: dict[str, str]) -> Op:
    _refuse_unpoliced(tensor, experts, policy, fields)
    if isinstance(policy, FromExpert):
        return experts[policy.from_].op(tensor)
    return Copy(Source(BASE, tensor))


def _model_sources(op: Op) -> list[Source]:
    """The model-folder tensors an op reads (adapter tensors were checked when opened)."""
    if isinstance(op, Copy):
        return [op.source]
    if isinstance(op, LoraMerge):
        return [op.base]
    if isinstance(op, Mean):
        return [op.base] + [s for c in op.changes for s in _model_sources(c.new)]
    return []


def _unused_changes(experts: dict[str, _Expert], recipe: Recipe) -> Iterator[str]:
    """Adapters' changes that the chosen policies leave out: legal, but worth a line."""
    embeddings = (mixtral.EMBED, mixtral.LM_HEAD)
    for expert in experts.values():
        if expert.adapter is None:
            continue
        changed = [*expert.adapter.modules, *expert.adapter.saved]
        groups = (
            ("shared_deltas", recipe.shared_deltas, "average",
             [t for t in changed if t not in embeddings and not t.endswith(tuple(mixtral.EXPERT_FROM_MLP.values()))]),
            ("embeddings", recipe.embeddings, None, [t for t in changed if t in embeddings]),
        )
        for key, policy, keeps_all, tensors in groups:
            kept = policy == keeps_all or (isinstance(policy, FromExpert) and policy.from_ == expert.name)
            if tensors and not kept:
                yield f"{key}: {expert.name}'s changes of {len(tensors)} tensors are not used (first {tensors[0]})"


def _warnings(loaded: LoadedRecipe, inputs: dict[str, Input], experts: dict[str, _Expert], fields: dict[str, str]):
    recipe = loaded.recipe
    k = recipe.router.experts_per_token
    n = len(experts)
    if recipe.router.mode == "gateless" and k is not None and k != n:
        yield f"router.experts_per_token: {k} is ignored by gateless, which uses all {n} experts"
    for expert in experts.values():
        if expert.adapter is None:
            continue
        field = fields[expert.name]
        stem = inputs[expert.stem]
        recorded = recorded_base_differs(expert.adapter, stem.path)
        if recorded:
            yield (f"{field}: {CONFIG_FILE} records base {recorded!r}, but it is applied to {stem.path} "
                   f"({fields[expert.stem]})")
        if expert.adapter.config.fan_in_fan_out:
            yield (f"{field}: fan_in_fan_out is true; peft ignores it for Linear and Embedding layers "
                   "(it sets it to false when loading), and so does mergekit-mode")
    yield from _unused_changes(experts, recipe)


def build_plan(loaded: LoadedRecipe) -> Plan:
    recipe = loaded.recipe
    inputs, fields = open_inputs(loaded)
    base = inputs[BASE]
    experts = _experts(loaded, inputs, fields)
    names = recipe.expert_names
    adapters = sum(e.adapter is not None for e in experts.values())
    dtype = _output_dtype(loaded, base)
    cfg = base.config
    num_layers = int(cfg["num_hidden_layers"])
    hidden = int(cfg["hidden_size"])
    tied = bool(cfg.get("tie_word_embeddings", False))

    used: set[str] = set()

    def output(name: str, tensor: str, op: Op) -> OutputTensor:
        """`name` in the output, made by `op` from the base tensor `tensor` (or its versions)."""
        shape = _tensor(base, tensor, "base_model").shape
        for src in _model_sources(op):
            _tensor(inputs[src.model], src.tensor, fields[src.model], shape)
        used.add(tensor)
        return OutputTensor(name, shape, dtype, op)

    def shared(tensor: str) -> OutputTensor:
        return output(tensor, tensor, _shared(tensor, experts, recipe.shared_deltas, adapters))

    def embedding(tensor: str) -> OutputTensor:
        return output(tensor, tensor, _embedding(tensor, experts, recipe.embeddings, fields))

    tensors = [embedding(mixtral.EMBED)]
    for layer in range(num_layers):
        prefix = mixtral.layer_prefix(layer)
        tensors += [shared(prefix + suffix) for suffix in mixtral.LAYER_SHARED]
        for e, name in enumerate(names):
            for proj, mlp in mixtral.EXPERT_FROM_MLP.items():
                op = experts[name].op(prefix + mlp)
                tensors.append(output(mixtral.expert_tensor(layer, e, proj), prefix + mlp, op))
        tensors.append(
            OutputTensor(mixtral.router_tensor(layer), (len(names), hidden), dtype,
                         RouterWeights(layer, recipe.router.mode))
        )
    tensors.append(shared(mixtral.FINAL_NORM))
    if not tied:
        tensors.append(embedding(mixtral.LM_HEAD))
    else:
        used.add(mixtral.LM_HEAD)  # tied: the runtime reuses the embeddings
        _refuse_unpoliced(mixtral.LM_HEAD, experts, recipe.embeddings, fields)
        source = recipe.embeddings
        if isinstance(source, FromExpert) and experts[source.from_].change(mixtral.LM_HEAD):
            raise ModeError(f"embeddings.from: the base ties lm_head to embed_tokens, so {source.from_}'s "
                            "change of lm_head has no place")

    leftover = sorted(n for n in base.tensors if n not in used and not n.endswith(mixtral.IGNORABLE_SUFFIXES))
    if leftover:
        raise ModeError(
            f"base_model: tensor {leftover[0]} has no place in a Mixtral checkpoint"
            + (f" (and {len(leftover) - 1} more)" if len(leftover) > 1 else "")
        )
    config = mixtral.build_config(cfg, len(names), recipe.top_k, str(dtype).removeprefix("torch."))
    warnings = tuple(_warnings(loaded, inputs, experts, fields))
    return Plan(loaded, inputs, config, dtype, tuple(tensors), warnings)
