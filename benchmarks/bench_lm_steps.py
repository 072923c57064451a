"""Early stopping of objective lm: how many steps it saves, and what it costs in perplexity.

Issue 13 asks for objective lm 5x faster at the same quality. A step cannot get 5x cheaper in
float32 on a CPU without bfloat16 units (docs/benchmarks.md: it would have to beat the float32
matmul floor), so the other route is fewer steps for the same perplexities: router.train.patience
stops training once the MoE's held-out loss, checked every check_every steps, has stopped falling.

Per seed, one training run on one of bench_quality's fixtures (fixtures.py): router.mode trained,
objective lm, init domain, all the steps, with the held-out check every check_every steps but no
stopping; each check's loss and routers are recorded, with the time of every step and check. The
recorded checks then go through the same EarlyStop the recipe's default patience uses (training is
the same with or without checks: they draw nothing from its random numbers), which gives where
training would stop and the routers it would keep. A MoE is written with the last step's routers
(patience 0, the behaviour before early stopping) and with the kept ones, plus --curve steps, and
`eval` scores each on every domain's held-out text. Speed-up: the seconds of all steps over the
seconds of the steps and checks up to the stop, both from the same run.

The real model (smollm2, made by real_model.py) runs the issue's run by default (150 lm steps, 150
domain steps a layer, 8000 tokens an expert: about an hour a seed, one thread); the synthetic
fixtures run the recipe's defaults (a minute or two a seed). Run by hand:

    python benchmarks/bench_lm_steps.py [--fixture smollm2] [--seeds 0,1,2] [--workdir DIR] [--steps N]
        [--curve 0,30,60] [--domain-steps N] [--layers 30] [--device cpu]

Training and evals compute in the dtype the CLI's `--compute-dtype auto` picks for --device.

The synthetic fixtures are made (or reused) in WORKDIR/fixtures, as bench_quality.py makes them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import real_model  # noqa: E402
from bench_real import recipe  # noqa: E402
from fixtures import FIXTURES, RealFixture  # noqa: E402

from mergekit_mode import build, router_modes, router_training  # noqa: E402
from mergekit_mode.evaluate import evaluate  # noqa: E402
from mergekit_mode.plan import Gates  # noqa: E402
from mergekit_mode.routers import RouterContext, make_routers  # noqa: E402

NEVER = 10**9  # a patience no run reaches: every step runs, every check is recorded


def log(message: str) -> None:
    print(f"{time.strftime('%X')} {message}", file=sys.stderr, flush=True)


@dataclass
class Check:
    step: int
    loss: float  # held-out mean next-token loss
    params: list[torch.Tensor]  # routers, then shared gates
    seconds: float  # the check's own time (its held-out forward)


@dataclass
class Trace:
    checks: list[Check]
    step_seconds: list[float]  # each lm step's time

    def stop(self, patience: int) -> tuple[Check, Check, float]:
        """(the check training stops at, the check whose routers are kept, seconds of every step
        and check up to the stop) with early stopping at `patience`."""
        stopper = router_training.EarlyStop(patience)
        for check in self.checks:
            if stopper.check(check.step, check.loss, check.params):
                break
        kept = next(c for c in self.checks if c.step == stopper.best_step)
        spent = sum(self.step_seconds[:check.step]) + sum(c.seconds for c in self.checks if c.step <= check.step)
        return check, kept, spent


def train_traced(plan, ctx: RouterContext) -> Trace:
    """Train the plan's routers (patience NEVER), recording every check and the time of each step."""
    checks: list[Check] = []
    step_seconds: list[float] = []
    check, adam_step, train_lm = router_training.EarlyStop.check, torch.optim.Adam.step, router_training.train_lm
    last = 0.0

    def lm(*args, **kwargs):
        nonlocal last
        last = time.perf_counter()
        return train_lm(*args, **kwargs)

    def recording(self, step, loss, params):
        nonlocal last
        now = time.perf_counter()
        checks.append(Check(step, loss, [p.detach().float().cpu().clone() for p in params], now - last))
        last = now
        return check(self, step, loss, params)

    def step(self, *args, **kwargs):  # lm's optimizer holds every layer's router, domain's one
        nonlocal last
        result = adam_step(self, *args, **kwargs)
        if len(self.param_groups[0]["params"]) > 1:
            now = time.perf_counter()
            step_seconds.append(now - last)
            last = now
        return result

    router_training.EarlyStop.check, torch.optim.Adam.step, router_training.train_lm = recording, step, lm
    try:
        make_routers(plan, ctx)
    finally:
        router_training.EarlyStop.check, torch.optim.Adam.step, router_training.train_lm = check, adam_step, train_lm
    return Trace(checks, step_seconds)


def perplexities(plan, params: list[torch.Tensor], folder: Path, eval_texts: dict[str, Path],
                 ctx: RouterContext) -> dict[str, float]:
    """`eval` of the plan's MoE written with these routers (and shared gates), on ctx's device and dtype."""
    layers = int(plan.config["num_hidden_layers"])
    made = build.make_routers
    build.make_routers = lambda _plan, _ctx: Gates(params[:layers], params[layers:])
    try:
        build.write_model(plan, folder, force=True, quiet=True)
    finally:
        build.make_routers = made
    result = {d: r.perplexity
              for d, r in evaluate(folder, eval_texts, quiet=True, device=ctx.device, dtype=ctx.dtype).items()}
    shutil.rmtree(folder)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixture", default="smollm2", choices=list(FIXTURES))
    ap.add_argument("--seeds", default="0", help="router.seed of each run (the lm batches' sampling)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="smollm2: bench_real.py's models and texts (default: TMP/mergekit-mode-real); otherwise "
                         "bench_quality.py's workdir (default: TMP/mergekit-mode-quality); made there if missing")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"lm steps of the run (default: 150 on smollm2, else {router_modes.FIT_DEFAULTS['lm'].steps})")
    ap.add_argument("--check-every", type=int, default=None, help="router.train.check_every (default: the recipe's)")
    ap.add_argument("--curve", default="", help="more steps (multiples of check_every) whose routers are scored")
    ap.add_argument("--domain-steps", type=int, default=None,
                    help="steps per layer of the domain init (default: 150 on smollm2, the recipe's default else)")
    ap.add_argument("--layers", type=int, default=real_model.LAYERS, help="smollm2's depth")
    ap.add_argument("--device", default="cpu", help="of the training, the evals and smollm2's fine-tuning if made now")
    args = ap.parse_args()
    torch.set_num_threads(1)
    fixture = FIXTURES[args.fixture]
    real = isinstance(fixture, RealFixture)
    workdir = args.workdir or Path(tempfile.gettempdir()) / ("mergekit-mode-real" if real else "mergekit-mode-quality")
    router = {"mode": "trained", "experts_per_token": 2, "train": {"objective": "lm", "init": "domain"}}
    if real:  # the run
        models = real_model.suite(workdir, layers=args.layers, device=args.device)
        steps, domain_steps = args.steps or 150, args.domain_steps or 150
        spec = recipe(models, router, max_tokens=8000)
        eval_texts, run = models.eval_texts, workdir / "runs" / "lm-steps"
    else:
        suite = fixture.build(workdir / "fixtures")
        steps, domain_steps = args.steps or router_modes.FIT_DEFAULTS["lm"].steps, args.domain_steps
        experts = fixture.recipe_experts(workdir / "fixtures", suite)
        spec = {"base_model": str(suite.base_dir), "experts": experts, "router": router}
        eval_texts, run = suite.eval_texts, workdir / "runs" / args.fixture / "lm-steps"
    router = spec["router"]  # bench_real.recipe copies it
    router["train"] |= {"steps": steps, "patience": NEVER} | ({"check_every": args.check_every}
                                                              if args.check_every else {})
    if domain_steps:  # the domain init takes domain's default steps (3000 a layer); the run used 150
        router_modes.FIT_DEFAULTS["domain"] = router_modes.Fit(domain_steps, router_modes.FIT_DEFAULTS["domain"].lr)
    curve = [int(k) for k in args.curve.split(",") if k]
    device = torch.device(args.device)
    ctx = RouterContext(device, quiet=True, dtype=build.compute_dtype("auto", device))  # the CLI's default dtype
    rows: list[dict] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        router["seed"] = seed
        run.mkdir(parents=True, exist_ok=True)
        (run / "recipe.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
        plan = build.plan_recipe(run / "recipe.yml")
        trace = train_traced(plan, ctx)
        # to replay another patience without training again; plain lists, dicts and tensors
        torch.save({"checks": [vars(c) for c in trace.checks], "step_seconds": trace.step_seconds},
                   run / f"trace-seed{seed}.pt")
        stopped, kept, spent = trace.stop(router_modes.PATIENCE)
        full = sum(trace.step_seconds)
        log(f"seed {seed}: all {steps} steps {full:.1f} s; early stopping at step {stopped.step} "
            f"(keeps step {kept.step}) {spent:.1f} s with its checks")
        scored = {"all steps": (trace.checks[-1], steps, full), "early stopping": (kept, stopped.step, spent)}
        scored |= {f"step {c.step}": (c, c.step, None) for c in trace.checks if c.step in curve}
        for name, (check, ran, seconds) in scored.items():
            ppl = perplexities(plan, check.params, run / "moe", eval_texts, ctx)
            rows.append({"seed": seed, "variant": name, "steps_run": ran, "kept_step": check.step,
                         "seconds": seconds, "held_out_loss": check.loss, "perplexity": ppl})
            log(f"seed {seed} {name}: " + ", ".join(f"{d} {p:.4f}" for d, p in ppl.items()))
    (run / "result.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


def table(rows: list[dict]) -> str:
    """Markdown: each variant's perplexities over the all-steps run's of the same seed."""
    full = {r["seed"]: r["perplexity"] for r in rows if r["variant"] == "all steps"}
    domains = list(next(iter(full.values())))
    lines = ["| seed | variant | steps run (kept) | lm seconds | " + " | ".join(domains) + " | worst vs all steps |",
             "|---" * (len(domains) + 5) + "|"]
    for r in rows:
        ratios = {d: r["perplexity"][d] / full[r["seed"]][d] for d in domains}
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['seed']} | {r['variant']} | {r['steps_run']} ({r['kept_step']}) | {secs} | "
                     + " | ".join(f"{r['perplexity'][d]:.4f} ({ratios[d]:.3f})" for d in domains)
                     + f" | {max(ratios.values()):.3f} |")
    early = [r for r in rows if r["variant"] == "early stopping"]
    speed = [full_row["seconds"] / r["seconds"] for r in early
             for full_row in rows if full_row["seed"] == r["seed"] and full_row["variant"] == "all steps"]
    worst = [max(r["perplexity"][d] / full[r["seed"]][d] for d in domains) for r in early]
    lines.append(f"\nearly stopping: {statistics.mean(speed):.2f}x faster (per seed " +
                 ", ".join(f"{s:.2f}x" for s in speed) + "); worst perplexity ratio to all steps " +
                 ", ".join(f"{w:.3f}" for w in worst))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
