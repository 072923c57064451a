"""`mergekit-mode demo`: the whole job on experts this machine trains in about a minute.

No model hub is reachable from many machines (and CI), so the demo makes everything itself: four
synthetic text domains, a sentencepiece tokenizer, a tiny Llama base pretrained on the mix, one
expert per domain fine-tuned from it (toy.build_domain_suite), then a recipe and the MoE built
through the same code path as `mergekit-mode recipe.yml out/`. It ends with a per-domain
perplexity table, so a first run shows what the tool is for: one model for every domain.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click
import yaml

from mergekit_mode.build import plan_recipe, write_model
from mergekit_mode.errors import ModeError
from mergekit_mode.toy import build_domain_suite, perplexity


def demo(out: Path, *, pretrain_steps: int, finetune_steps: int, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ModeError(f"{out}: folder exists and is not empty (use --force to replace it)")
        shutil.rmtree(out)
    click.echo(f"training a tokenizer, a tiny Llama base and one expert per domain in {out} ...")
    # One thread: steady ~90 ms a step; two threads on a busy 2-core machine spin at 1-2 s a step.
    suite = build_domain_suite(out, pretrain_steps=pretrain_steps, finetune_steps=finetune_steps, num_threads=1)
    recipe_file = out / "recipe.yml"
    recipe = {
        "base_model": "./base",
        "experts": [{"name": d, "model": f"./experts/{d}"} for d in suite.experts],
        "router": {"mode": "gateless"},
    }
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    click.echo(f"building the MoE: mergekit-mode {recipe_file} {out / 'moe'}")
    write_model(plan_recipe(recipe_file), out / "moe", quiet=True)

    domains = list(suite.experts)
    models = {"base": suite.base_dir, **{f"{d} expert": p for d, p in suite.experts.items()},
              "MoE (gate-less)": out / "moe"}
    click.echo("\nperplexity on held-out text of each domain (lower is better)\n")
    click.echo(f"{'model':<20}" + "".join(f"{d:>12}" for d in domains))
    for name, folder in models.items():
        row = [perplexity(folder, suite.eval_texts[d].read_text()) for d in domains]
        click.echo(f"{name:<20}" + "".join(f"{p:>12.2f}" for p in row))
    click.echo(f"\nthe MoE is in {out / 'moe'}; load it with AutoModelForCausalLM.from_pretrained")
