"""`mergekit-mode demo`: the whole job on experts this machine trains in about a minute.

No model hub is reachable from many machines (and CI), so the demo makes everything itself: four
synthetic text domains, a sentencepiece tokenizer, a tiny Llama base pretrained on the mix, one
expert per domain fine-tuned from it, then a recipe and the MoE built through the same code path
as `mergekit-mode recipe.yml out/`. It ends with a per-domain perplexity table, so a first run
shows what the tool is for: one model that serves every domain.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click
import yaml

from mergekit_mode.build import plan_recipe, write_model
from mergekit_mode.toy import DOMAINS, generate, make_model, train_tokenizer
from mergekit_mode.toy.train import finetune, perplexity, pretrain

# Sizes that train in about a minute on 2 CPU cores and still make each expert clearly better
# than the base on its own domain.
MODEL = dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=512)
TRAIN_CHARS, HELDOUT_CHARS = 60_000, 8_000


def prepare(work: Path, pretrain_steps: int, finetune_steps: int, log=click.echo) -> dict[str, Path]:
    """Corpora, tokenizer, base and experts under `work`; returns held-out text files by domain."""
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    train = {d: generate(d, TRAIN_CHARS, seed=1) for d in DOMAINS}
    heldout = {}
    for d in DOMAINS:
        heldout[d] = data / f"{d}.heldout.txt"
        heldout[d].write_text(generate(d, HELDOUT_CHARS, seed=2))
        (data / f"{d}.txt").write_text(train[d])
    log("training a tokenizer and a tiny Llama base on a mix of " + ", ".join(DOMAINS))
    tokenizer = train_tokenizer(train.values(), work / "tokenizer", vocab_size=MODEL["vocab_size"])
    base = make_model(work / "base", "llama", tokenizer_dir=tokenizer, seed=0, **MODEL)
    pretrain(base, train, pretrain_steps)
    for d in DOMAINS:
        log(f"fine-tuning the {d} expert")
        finetune(base, work / "experts" / d, train[d], finetune_steps, mlp_only=True, seed=1)
    return heldout


def demo(out: Path, *, pretrain_steps: int, finetune_steps: int, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            from mergekit_mode.errors import ModeError

            raise ModeError(f"{out}: folder exists and is not empty (use --force to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    heldout = prepare(out, pretrain_steps, finetune_steps)
    recipe = {
        "base_model": "./base",
        "experts": [{"name": d, "model": f"./experts/{d}"} for d in DOMAINS],
        "router": {"mode": "gateless"},
    }
    recipe_file = out / "recipe.yml"
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    click.echo(f"building the MoE: mergekit-mode {recipe_file} {out / 'moe'}")
    write_model(plan_recipe(recipe_file), out / "moe", quiet=True)

    models = {"base": out / "base", **{f"{d} expert": out / "experts" / d for d in DOMAINS}, "MoE (gate-less)": out / "moe"}
    click.echo("\nperplexity on held-out text (lower is better)\n")
    click.echo(f"{'model':<20}" + "".join(f"{d:>12}" for d in DOMAINS))
    for name, folder in models.items():
        row = [perplexity(folder, heldout[d].read_text()) for d in DOMAINS]
        click.echo(f"{name:<20}" + "".join(f"{p:>12.2f}" for p in row))
    click.echo(f"\nthe MoE is in {out / 'moe'} (load it with AutoModelForCausalLM.from_pretrained)")
