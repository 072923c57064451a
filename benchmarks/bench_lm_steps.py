"""Perplexity of lm-trained routers after k lm steps: does training need all its steps?

Issue 13 asks for objective lm 5x faster at the same quality. A step cannot get 5x cheaper in
float32 on a CPU without bfloat16 units (docs/benchmarks.md: it would have to beat the float32
matmul floor), so the other route is fewer steps (or tokens) for the same perplexities. This
measures that route on the real model of bench_real.py (SmolLM2-135M, four experts): one training
run (router.mode trained, objective lm, init domain, as in the issue's run), the routers kept at
the chosen steps, then a MoE written with each and `eval` on every domain's held-out text. Step 0
is the domain-classifier init itself. Run by hand (about an hour at 150 steps, one thread):

    python benchmarks/bench_lm_steps.py [--workdir DIR] [--steps 150] [--keep 0,15,30,60,150]
        [--domain-steps 150] [--layers 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import real_model  # noqa: E402
from bench_real import recipe  # noqa: E402

from mergekit_mode import build, router_modes, router_training  # noqa: E402
from mergekit_mode.evaluate import evaluate  # noqa: E402
from mergekit_mode.plan import Gates  # noqa: E402
from mergekit_mode.routers import RouterContext, make_routers  # noqa: E402


def log(message: str) -> None:
    print(f"{time.strftime('%X')} {message}", file=sys.stderr, flush=True)


def train_keeping(plan, keep: set[int]) -> dict[int, list[torch.Tensor]]:
    """Train the plan's routers; the routers after each step in `keep` (0: the lm init)."""
    kept: dict[int, list[torch.Tensor]] = {}
    train_lm, adam_step = router_training.train_lm, torch.optim.Adam.step
    steps = 0

    def lm(plan, texts, init, ctx):
        kept[0] = [t.float().clone() for t in init]
        log("lm init ready (step 0)")
        return train_lm(plan, texts, init, ctx)

    def step(self, *args, **kwargs):  # lm's optimizer holds every layer's router, domain's one
        nonlocal steps
        result = adam_step(self, *args, **kwargs)
        params = self.param_groups[0]["params"]
        if len(params) > 1:
            steps += 1
            if steps in keep:
                kept[steps] = [p.detach().float().clone() for p in params]
                log(f"lm step {steps}")
        return result

    router_training.train_lm, torch.optim.Adam.step = lm, step
    try:
        make_routers(plan, RouterContext(torch.device("cpu"), quiet=True))
    finally:
        router_training.train_lm, torch.optim.Adam.step = train_lm, adam_step
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mergekit-mode-real",
                    help="bench_real.py's models and texts (made there if missing)")
    ap.add_argument("--steps", type=int, default=150, help="lm steps of the run")
    ap.add_argument("--keep", default="0,15,30,60,150", help="steps whose routers are evaluated")
    ap.add_argument("--domain-steps", type=int, default=150, help="steps per layer of the domain init")
    ap.add_argument("--layers", type=int, default=real_model.LAYERS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    keep = {int(k) for k in args.keep.split(",") if k}

    suite = real_model.suite(args.workdir, layers=args.layers)
    run = args.workdir / "runs" / "lm-steps"
    run.mkdir(parents=True, exist_ok=True)
    router = {"mode": "trained", "experts_per_token": 2,
              "train": {"objective": "lm", "init": "domain", "steps": args.steps}}
    (run / "recipe.yml").write_text(yaml.safe_dump(recipe(suite, router, max_tokens=8000), sort_keys=False))
    # the domain init takes domain's default steps (3000 a layer); the run used 150
    router_modes.FIT_DEFAULTS["domain"] = router_modes.Fit(args.domain_steps, router_modes.FIT_DEFAULTS["domain"].lr)
    plan = build.plan_recipe(run / "recipe.yml")

    start = time.perf_counter()
    kept = train_keeping(plan, keep)
    log(f"trained in {time.perf_counter() - start:.0f} s")
    results: dict[int, dict[str, float]] = {}
    for k in sorted(kept):
        folder = run / f"moe-{k}"
        made = build.make_routers
        build.make_routers = lambda _plan, _ctx, k=k: Gates(kept[k], [])
        try:
            build.write_model(plan, folder, force=True, quiet=True)
        finally:
            build.make_routers = made
        results[k] = {d: r.perplexity for d, r in evaluate(folder, suite.eval_texts, quiet=True).items()}
        shutil.rmtree(folder)
        log(f"step {k}: " + ", ".join(f"{d} {p:.4f}" for d, p in results[k].items()))
    (run / "result.json").write_text(json.dumps(results, indent=1))

    last = max(results)
    print("\n| lm steps | " + " | ".join(results[last]) + f" | worst vs step {last} |")
    print("|---|" + "---|" * (len(results[last]) + 1))
    for k, ppl in results.items():
        ratios = {d: p / results[last][d] for d, p in ppl.items()}
        print(f"| {k} | " + " | ".join(f"{p:.4f} ({ratios[d]:.3f})" for d, p in ppl.items())
              + f" | {max(ratios.values()):.3f} |")


if __name__ == "__main__":
    main()
