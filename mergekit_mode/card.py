"""The model card (README.md) of an output: what it is, what it was made from, how to load it."""

from __future__ import annotations

import json
from importlib.metadata import version

from mergekit_mode import __version__
from mergekit_mode.plan import BASE, Plan
from mergekit_mode.recipe import Recipe
from mergekit_mode.stem import resolve_stem

ROUTER_TEXT = {
    "gateless": "gate-less: every expert runs on every token with equal weight 1/E (router weights are zero)",
    "noisy": "noisy: Gaussian router weights, top-k experts per token",
    "random": "random: standard-normal router weights (mergekit-moe's `random`), top-k experts per token",
    "hidden": "hidden: each row is the base's pooled router input (post_attention_layernorm output) on that "
              "expert's data, L2-normalised (mergekit's hidden / hidden_avg at the real router input), top-k experts per token",
    "trained": "trained: router weights trained on the experts' data with everything else frozen (see router.train "
               "in the recipe), top-k experts per token",
}


def stem_text(recipe: Recipe) -> str:
    """How the shared tensors were made, with the method's parameters as the recipe set them."""
    stem = resolve_stem(recipe.stem, recipe.expert_names)
    if stem is None:
        return "copied from the base model"
    spec = recipe.stem
    per_model = "".join(f"; {m.model}: `{json.dumps(m.parameters)}`" for m in spec.models or () if m.parameters)
    return (f"merged by mergekit {version('mergekit')}'s `{stem.method}` of {', '.join(stem.inputs)} "
            f"(base: {stem.base or 'none'}; seed {stem.seed}), parameters `{json.dumps(spec.parameters)}`{per_model}")


def model_card(plan: Plan) -> str:
    recipe = plan.recipe.recipe
    cfg = plan.config
    rows = "\n".join(
        f"| {e} | {name} | `{spec.model}` |" for e, (name, spec) in enumerate(zip(recipe.expert_names, recipe.experts))
    )
    return f"""---
base_model: {recipe.base_model}
library_name: transformers
tags:
- mergekit
- mergekit-mode
- moe
- mixtral
---
# Mixture of Domain Experts

A Mixtral-format Mixture-of-Experts built by [mergekit-mode](https://pypi.org/project/mergekit-mode/)
{__version__}. The base model `{recipe.base_model}` gives the tokenizer and, unless the recipe's
`stem:` merges them, attention, embeddings and norms; each expert brings its MLP.

| expert | name | source |
|---|---|---|
{rows}

- Shared tensors (embeddings, attention, norms, lm_head): {stem_text(recipe)}.
- Router `{recipe.router.mode}`: {ROUTER_TEXT[recipe.router.mode]} (seed {recipe.router.seed}).
- {cfg['num_local_experts']} experts, {cfg['num_experts_per_tok']} per token, {cfg['num_hidden_layers']} layers,
  dtype {cfg['dtype']}, base architecture `{plan.inputs[BASE].model_type}`.

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
