"""The model card (README.md) of an output: what it is, what it was made from, how to load it."""

from __future__ import annotations

import json
from importlib.metadata import version

from mergekit_mode import __version__
from mergekit_mode.adapters import AdapterFolder
from mergekit_mode.plan import BASE, Plan
from mergekit_mode.recipe import ExpertSpec, FromExpert, Recipe

ROUTER_TEXT = {
    "gateless": "gate-less: every expert runs on every token with equal weight 1/E (router weights are zero)",
    "noisy": "noisy: Gaussian router weights, top-k experts per token",
    "random": "random: standard-normal router weights (mergekit-moe's `random`), top-k experts per token",
    "hidden": "hidden: each row is the base's pooled router input (post_attention_layernorm output) on that "
              "expert's data, L2-normalised (mergekit's hidden / hidden_avg at the real router input), "
              "top-k experts per token",
    "trained": "trained: router weights trained on the experts' data with everything else frozen (see router.train "
               "in the recipe), top-k experts per token",
}


SHARED_TEXT = {  # stem: base with adapter experts, by shared_deltas
    "average": "the base's plus the mean of the adapter experts' changes (an adapter that leaves a tensor alone "
    "counts as a zero change; full fine-tunes bring only their MLP)",
    "drop": "the base's (adapters' changes outside the MLP are dropped)",
}


def _source(spec: ExpertSpec) -> str:
    if spec.adapter is None:
        return f"`{spec.model}`"
    return f"LoRA `{spec.adapter}` on " + (f"`{spec.model}`" if spec.model else "the base")


def _lora_text(name: str, adapter: AdapterFolder) -> str:
    """What was merged, per adapter: enough to tell two builds of the same folders apart."""
    loras = adapter.modules.values()
    targets = sorted({lora.weight.removesuffix(".weight").rsplit(".", 1)[-1] for lora in loras})
    ranks = ", ".join(str(r) for r in sorted({lora.r for lora in loras})) or "-"
    alphas = ", ".join(f"{a:g}" for a in sorted({lora.alpha for lora in loras})) or "-"
    scales = ", ".join(f"{s:g}" for s in sorted({lora.scale for lora in loras})) or "-"
    kind = " + ".join(["LoRA"] + ["rsLoRA scaling"] * adapter.rslora + ["DoRA"] * adapter.dora)
    saved = f"; modules_to_save {', '.join(sorted(adapter.saved))}" if adapter.saved else ""
    return (f"- `{name}`: {kind}, rank {ranks}, alpha {alphas}, scaling {scales}, "
            f"targets {', '.join(targets) or '-'}{saved}")


def _policy_text(policy: object, texts: dict[object, str]) -> str:
    if isinstance(policy, FromExpert):
        return f"taken from expert `{policy.from_}`"
    return texts[policy]


def stem_text(recipe: Recipe) -> str:
    """How the shared tensors were made, with the method's parameters as the recipe set them."""
    if recipe.stem is None:
        if all(e.adapter is None for e in recipe.experts):
            return "copied from the base model"
        return (f"attention and norms: {_policy_text(recipe.shared_deltas, SHARED_TEXT)}; "
                "embeddings and lm_head: "
                + _policy_text(recipe.embeddings, {None: "the base's (no adapter changes them)", "base": "the base's"}))
    from mergekit_mode.stem import resolve_stem  # mergekit: only for recipes with a stem merge

    stem = resolve_stem(recipe.stem, recipe.expert_names)
    spec = recipe.stem
    per_model = "".join(f"; {m.model}: `{json.dumps(m.parameters)}`" for m in spec.models or () if m.parameters)
    return (f"merged by mergekit {version('mergekit')}'s `{stem.method}` of {', '.join(stem.inputs)} "
            f"(base: {stem.base or 'none'}; seed {stem.seed}), parameters `{json.dumps(spec.parameters)}`{per_model}")


def format_text(plan: Plan) -> str:
    """What the format adds to the router's choice, one line each (ending in a newline): top-k weights
    left unscaled and the shared expert, where the format has them; nothing otherwise."""
    lines = []
    if not plan.format.renormalise and plan.top_k < plan.num_experts:
        lines.append(f"- The {plan.top_k} chosen experts keep their softmax weights over all {plan.num_experts} "
                     f"(not rescaled to sum to 1: {plan.format.title} as llama.cpp runs it).")
    if plan.shared is not None:
        policy = plan.recipe.recipe.shared_expert
        what = (f"expert `{policy.from_}`'s MLP" if isinstance(policy, FromExpert) else
                "the base's MLP" if policy == "base" else "unused (all zeros), so the block is the routed mixture")
        router = plan.recipe.recipe.router
        gate = ("its gate trained with the routers" if router.mode == "trained" and router.training.objective == "lm"
                else "its gate near zero: weight about 0.5")
        lines.append(f"- Shared expert, added on every token with weight sigmoid(gate . x) ({gate}): {what}.")
    return "".join(line + "\n" for line in lines)


def model_card(plan: Plan, note: str | None = None) -> str:
    """The card; `note`: a line about how this build differs from a plain build of its recipe (edit)."""
    recipe = plan.recipe.recipe
    cfg = plan.config
    rows = "\n".join(
        f"| {e} | {name} | {_source(spec)} |" for e, (name, spec) in enumerate(zip(recipe.expert_names, recipe.experts))
    )
    loras = [_lora_text(name, plan.inputs[name]) for name, spec in zip(recipe.expert_names, recipe.experts)
             if spec.adapter is not None]
    adapters = "" if not loras else (
        "\n## Adapters\n\nMerged into their weights as peft's `merge_and_unload()` does, in float32:\n\n"
        + "\n".join(loras) + "\n"
    )
    edited = f"- {note}\n" if note else ""
    return f"""---
base_model: {recipe.base_model}
library_name: transformers
tags:
- mergekit
- mergekit-mode
- moe
- {plan.format.name}
---
# Mixture of Domain Experts

A {plan.format.title}-format Mixture-of-Experts built by [mergekit-mode](https://pypi.org/project/mergekit-mode/)
{__version__}. The base model `{recipe.base_model}` gives the tokenizer and, unless the recipe's
`stem:` merges them, attention, embeddings and norms; each expert brings its MLP.

| expert | name | source |
|---|---|---|
{rows}

- Shared tensors (embeddings, attention, norms, lm_head): {stem_text(recipe)}.
- Router `{recipe.router.mode}`: {ROUTER_TEXT[recipe.router.mode]} (seed {recipe.router.seed}).
- {plan.num_experts} experts, {plan.top_k} per token, {cfg['num_hidden_layers']} layers,
  dtype {cfg['dtype']}, base architecture `{plan.inputs[BASE].model_type}`.
{format_text(plan)}{plan.carried.card_text()}
{edited}{adapters}
Loads with no custom code:

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
```

## Recipe

```yaml
{plan.recipe.text.rstrip()}
```
"""
