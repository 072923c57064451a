"""How far can router rows go? Routers fitted on the very text they are scored on.

A Mixtral or Qwen-MoE router is a linear function of one token's router input. When the default
router misses its target on a fixture, this tells whether the miss is the router's data (trained on
other text than it is scored on), its objective, or what rows can express at all: each variant is
built twice, once with each expert's training text as its `data:` (as bench_quality does) and once
with its held-out evaluation text itself, and scored with `mergekit-mode eval` on that held-out
text. Fixtures and the Run machinery are bench_quality's (cached in --workdir). Run by hand:

    python benchmarks/bench_router_bound.py [--workdir DIR] [--fixtures grammars,markov-sharp,markov-gentle]
        [--lm-steps 1000]

Prints the ratio of each variant to each domain's own expert, and writes them as JSON into the workdir.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import bench_quality as bq
from fixtures import FIXTURES

TEXTS = ("train", "eval")  # which text each expert's `data:` is


def variants(lm_steps: int) -> dict[str, dict]:
    return {
        "defaults": bq.TRAINED[bq.DEFAULT],
        f"lm init domain, {lm_steps} steps at lr 1e-2": {
            **bq.TOP2, "mode": "trained",
            "train": {"objective": "lm", "init": "domain", "steps": lm_steps, "lr": 1e-2}},
    }


def measure(name: str, work: Path, lm_steps: int) -> dict[str, dict[str, float]]:
    """{variant, data text -> {domain: perplexity / own expert's}} on one fixture."""
    suite = FIXTURES[name].build(work / "fixtures")
    held = suite.eval_texts
    own = {d: bq.perplexities(p, {d: held[d]})[d] for d, p in suite.experts.items()}
    ratios = {}
    for text in TEXTS:
        texts = suite.train_texts if text == "train" else suite.eval_texts
        run = bq.Run(name, work / "runs" / name / text, suite, suite.experts,
                     entries=[{"name": d, "model": str(p), "data": str(texts[d])} for d, p in suite.experts.items()])
        for label, router in variants(lm_steps).items():
            scored = bq.perplexities(run.build(label, router, None), held)
            row = ratios[f"{label}, rows fitted on the {text} text"] = {d: scored[d] / own[d] for d in own}
            worst = max(row, key=row.get)
            print(f"[{name}] {label}, {text} text: worst {row[worst]:.3f} ({worst}); "
                  + ", ".join(f"{d} {r:.3f}" for d, r in row.items()), flush=True)
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="fixtures and models (default: a temp dir)")
    ap.add_argument("--fixtures", default="grammars,markov-sharp,markov-gentle")
    ap.add_argument("--lm-steps", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as bench_quality: two threads spin on each other on a shared 2-core machine
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mkmode-bound-"))
    results = {name: measure(name, work, args.lm_steps) for name in args.fixtures.split(",")}
    (work / "router_bound.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {work / 'router_bound.json'}")


if __name__ == "__main__":
    main()
