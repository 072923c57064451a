"""Where each expert's version of a base tensor comes from, and the policies for what experts share.

An expert starts from weights (its fine-tune, or the base for a lone adapter) and may carry an
adapter; `Expert.op` says how to make its version of any base tensor and `Expert.change` what
its adapter changed. Only the MLP differs per expert in every output format: attention and norms
follow the recipe's `shared_deltas` policy, embeddings and lm_head its `embeddings` policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Union

from mergekit_mode.adapters import CONFIG_FILE, AdapterFolder, check_biases, recorded_base_differs
from mergekit_mode.errors import ModeError
from mergekit_mode.formats.families import EMBED, LM_HEAD, MLP_ROLES, BaseFamily
from mergekit_mode.inputs import ModelFolder, TensorInfo, TensorReader
from mergekit_mode.ops import BASE, Change, Copy, LoraMerge, Mean, Op, Source, StemMerge
from mergekit_mode.recipe import FromExpert, LoadedRecipe, Recipe

if TYPE_CHECKING:
    from mergekit_mode.stem import Stem

Input = Union[ModelFolder, AdapterFolder]


def model_key(name: str) -> str:
    """Input key of the fine-tune an adapter expert is applied to (the adapter's own key is `name`)."""
    return f"{name}.model"


@dataclass(frozen=True)
class Expert:
    """Where one expert's version of each base tensor comes from."""

    name: str
    start: str  # input key of the weights it starts from: its fine-tune, or BASE for a lone adapter
    adapter: AdapterFolder | None

    def op(self, tensor: str) -> Union[LoraMerge, Copy]:
        lora = self.adapter.modules.get(tensor) if self.adapter else None
        if lora is not None:
            magnitude = Source(self.name, lora.magnitude.name) if lora.magnitude else None
            return LoraMerge(Source(self.start, tensor), Source(self.name, lora.lora_A.name),
                             Source(self.name, lora.lora_B.name), lora.scale, lora.transpose, magnitude)
        if self.adapter is not None and tensor in self.adapter.saved:
            return Copy(Source(self.name, self.adapter.saved[tensor].name))
        return Copy(Source(self.start, tensor))

    def change(self, tensor: str) -> Change | None:
        """What the adapter does to `tensor`; None when nothing (always, for a full fine-tune)."""
        new, old = self.op(tensor), Source(self.start, tensor)
        return None if new == Copy(old) else Change(self.name, new, old)


def experts_of(loaded: LoadedRecipe, inputs: dict[str, Input], fields: dict[str, str]) -> dict[str, Expert]:
    """Each expert's start and adapter; adapters checked against the weights they apply to."""
    experts = {}
    for spec, name in zip(loaded.recipe.experts, loaded.recipe.expert_names):
        if spec.adapter is None:
            experts[name] = Expert(name, name, None)
            continue
        adapter = inputs[name]
        assert isinstance(adapter, AdapterFolder)
        start = model_key(name) if spec.model is not None else BASE
        _check_adapter(adapter, inputs[start], fields[name])
        experts[name] = Expert(name, start, adapter)
    return experts


def _weight(start: ModelFolder, name: str) -> TensorInfo | None:
    """The start's tensor `name`; a tied lm_head is the embedding (the `embeddings` policy decides
    later what happens to an adapter's change of it)."""
    if name == LM_HEAD.name and name not in start.tensors and start.config.get("tie_word_embeddings"):
        name = EMBED.name
    return start.tensors.get(name)


def _check_adapter(adapter: AdapterFolder, start: Input, field: str) -> None:
    assert isinstance(start, ModelFolder)
    for lora in adapter.modules.values():
        info = _weight(start, lora.weight)
        if info is None:
            raise ModeError(f"{field}: LoRA on {lora.weight.removesuffix('.weight')}, which {start.path} lacks")
        if info.shape != lora.expected_weight_shape():
            raise ModeError(f"{field}: LoRA on {lora.weight.removesuffix('.weight')} fits a weight of shape "
                            f"{list(lora.expected_weight_shape())}, {start.path} has {list(info.shape)}")
    for name, saved in adapter.saved.items():
        info = _weight(start, name)
        if info is None or info.shape != saved.shape:
            have = f"has shape {list(info.shape)}" if info else "lacks it"
            raise ModeError(f"{field}: saves {name} with shape {list(saved.shape)} (modules_to_save); {start.path} {have}")
    with TensorReader() as reader:
        check_biases(adapter, reader, field)


def shared_op(tensor: str, experts: dict[str, Expert], policy: object, adapters: int) -> Op:
    """A tensor the experts share (attention, norms), by the shared_deltas policy."""
    if isinstance(policy, FromExpert):
        return experts[policy.from_].op(tensor)
    changes = tuple(c for e in experts.values() if (c := e.change(tensor)) is not None)
    if policy == "drop" or not changes:
        return Copy(Source(BASE, tensor))
    return Mean(Source(BASE, tensor), changes, adapters)


def stem_op(stem: Stem, tensor: str, t: float, experts: dict[str, Expert]) -> StemMerge:
    """A shared tensor merged by `stem:` from each stem model's version of it: an adapter expert
    enters as a model of its own (its weights with the adapter merged). `t` is mergekit's layer
    fraction, for gradients."""
    shared, per_input = stem.parameters(tensor, t)
    base_index = stem.inputs.index(stem.base) if stem.base is not None else None
    inputs = tuple(experts[m].op(tensor) if m in experts else Copy(Source(BASE, tensor)) for m in stem.inputs)
    return StemMerge(stem.method, stem.inputs, inputs, base_index, shared, per_input, stem.seed)


def _refuse_unpoliced(tensor: str, experts: dict[str, Expert], policy: object, fields: dict[str, str]) -> None:
    """embed_tokens / lm_head are shared too, and no average makes sense for them, so an adapter
    that changes them needs an explicit `embeddings` policy."""
    if policy is not None:
        return
    for name, expert in experts.items():
        if expert.change(tensor) is not None:
            raise ModeError(f"{fields[name]}: changes {tensor} (LoRA target or modules_to_save), which the output's "
                            f"experts share: set `embeddings: base` or `embeddings: {{from: {name}}}`")


def embedding_op(tensor: str, experts: dict[str, Expert], policy: object, fields: dict[str, str]) -> Op:
    _refuse_unpoliced(tensor, experts, policy, fields)
    if isinstance(policy, FromExpert):
        return experts[policy.from_].op(tensor)
    return Copy(Source(BASE, tensor))


def _kept(policy: object, keeps_all: object, name: str) -> bool:
    return policy == keeps_all or (isinstance(policy, FromExpert) and policy.from_ == name)


def _unused_changes(experts: dict[str, Expert], recipe: Recipe, merged: tuple[str, ...] | None,
                    family: BaseFamily) -> Iterator[str]:
    """Adapters' changes outside the MLP that the recipe leaves out: legal, but worth a line.
    `merged`: the models of a `stem:` merge (None with `stem: base`)."""
    embeddings = (EMBED.name, LM_HEAD.name)
    mlp = tuple(family.mlp(role).name for role in MLP_ROLES)
    for expert in experts.values():
        if expert.adapter is None:
            continue
        changed = [t for t in (*expert.adapter.modules, *expert.adapter.saved) if not t.endswith(mlp)]
        if merged is not None:
            groups = [("stem.models", expert.name in merged, changed)]
        else:
            groups = [("shared_deltas", _kept(recipe.shared_deltas, "average", expert.name),
                       [t for t in changed if t not in embeddings]),
                      ("embeddings", _kept(recipe.embeddings, None, expert.name), [t for t in changed if t in embeddings])]
        for key, kept, tensors in groups:
            if tensors and not kept:
                yield f"{key}: {expert.name}'s changes of {len(tensors)} tensors are not used (first {tensors[0]})"


def check_tied_lm_head(
    experts: dict[str, Expert], policy: object, fields: dict[str, str], merged: tuple[str, ...] | None
) -> None:
    """With tied embeddings the output has no lm_head of its own: an adapter's lm_head change
    would be lost, so it is refused unless the policy drops it anyway. `merged`: as in _unused_changes."""
    if merged is not None:
        for name in merged:
            if name in experts and experts[name].change(LM_HEAD.name):
                raise ModeError(f"stem.models: the base ties lm_head to embed_tokens, so {name}'s change of "
                                "lm_head has no place")
        return
    _refuse_unpoliced(LM_HEAD.name, experts, policy, fields)
    if isinstance(policy, FromExpert) and experts[policy.from_].change(LM_HEAD.name):
        raise ModeError(f"embeddings.from: the base ties lm_head to embed_tokens, so {policy.from_}'s "
                        "change of lm_head has no place")


def adapter_warnings(
    inputs: dict[str, Input], experts: dict[str, Expert], fields: dict[str, str], recipe: Recipe,
    merged: tuple[str, ...] | None, family: BaseFamily,
) -> Iterator[str]:
    """What is legal but likely unintended: a different recorded base, an ignored option, unused changes."""
    for expert in experts.values():
        if expert.adapter is None:
            continue
        field = fields[expert.name]
        start = inputs[expert.start]
        recorded = recorded_base_differs(expert.adapter, start.path)
        if recorded:
            yield (f"{field}: {CONFIG_FILE} records base {recorded!r}, but it is applied to {start.path} "
                   f"({fields[expert.start]})")
        if expert.adapter.config.fan_in_fan_out:
            yield (f"{field}: fan_in_fan_out is true; peft ignores it for Linear and Embedding layers "
                   "(it sets it to false when loading), and so does mergekit-mode")
    yield from _unused_changes(experts, recipe, merged, family)
