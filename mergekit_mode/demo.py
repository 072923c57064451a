"""`mergekit-mode demo`: the whole job on experts this machine trains in about a minute.

No model hub is reachable from many machines (and CI), so the demo makes everything itself: four
synthetic text domains, a sentencepiece tokenizer, a tiny base (Llama, or Qwen2 or Qwen3 with
--arch, for their MoE formats) pretrained on the mix, one expert per domain fine-tuned from it (toy.build_domain_suite; MLP-only, so the shared stem is the
one the experts were trained with), then two recipes and their MoEs, built through the same code
path as `mergekit-mode recipe.yml out/`: gate-less, and a top-2 router trained on each expert's
training text. It ends with `eval`'s per-domain perplexity of every model, so a first run shows
what the tool is for: one model that serves every domain about as well as its expert.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click
import yaml

from mergekit_mode.build import plan_recipe, write_model
from mergekit_mode.evaluate import evaluate
from mergekit_mode.toy import build_domain_suite
from mergekit_mode.toy.train import torch_threads
from mergekit_mode.writer import check_destination

ROUTERS = {
    "gateless": {"mode": "gateless"},
    # The variant that keeps every domain within 5% of its expert (benchmarks/bench_quality.py).
    "trained": {"mode": "trained", "experts_per_token": 2, "train": {"objective": "lm", "init": "domain"}},
}


ARCHS = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}
# Written first into a demo's folder: --force replaces only folders that carry it.
DEMO_MARKER = ".mergekit-mode-demo"


def demo(out: Path, *, pretrain_steps: int, finetune_steps: int, force: bool, replace_foreign: bool = False,
         arch: str = "llama") -> None:
    # the build's own rules: no symlink, no overwrite unasked, --force only over an earlier demo
    check_destination(out, force, needed_bytes=0, replace_foreign=replace_foreign, marker=DEMO_MARKER)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    (out / DEMO_MARKER).write_text("made by `mergekit-mode demo`; `demo --force` may replace this folder\n")
    click.echo(f"training a tokenizer, a tiny {ARCHS[arch]} base and one expert per domain in {out} ...")
    # One thread: steady ~90 ms a step; two threads on a busy 2-core machine spin at 1-2 s a step.
    suite = build_domain_suite(out, arch=arch, pretrain_steps=pretrain_steps, finetune_steps=finetune_steps,
                               num_threads=1)
    models = {"base": suite.base_dir, **{f"{d} expert": p for d, p in suite.experts.items()}}
    for name, router in ROUTERS.items():
        recipe = {
            "base_model": "./base",
            "experts": [{"name": d, "model": f"./experts/{d}", "data": f"./data/train/{d}.txt"}
                        for d in suite.experts],
            "router": router,
        }
        recipe_file = out / f"recipe-{name}.yml"
        recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
        click.echo(f"mergekit-mode {recipe_file} {out / f'moe-{name}'}")
        with torch_threads(1):
            write_model(plan_recipe(recipe_file), out / f"moe-{name}", quiet=True)
        models[f"MoE {name}"] = out / f"moe-{name}"

    domains = list(suite.experts)
    click.echo("\nperplexity on held-out text of each domain (lower is better; mergekit-mode eval)\n")
    click.echo(f"{'model':<20}" + "".join(f"{d:>12}" for d in domains))
    with torch_threads(1):
        for name, folder in models.items():
            results = evaluate(folder, dict(suite.eval_texts), max_tokens=8_000)
            click.echo(f"{name:<20}" + "".join(f"{results[d].perplexity:>12.2f}" for d in domains))
    click.echo(f"\nthe MoEs are in {out}/moe-*; load one with AutoModelForCausalLM.from_pretrained")
