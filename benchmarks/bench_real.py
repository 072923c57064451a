"""Every data-driven stage on a real pretrained model: time and peak RSS against a baseline, one run.

The model is SmolLM2-135M-Instruct (30 layers, hidden 576) with four experts fine-tuned here, two
MLP-only and two LoRA adapters on all linear layers (real_model.py: made once, cached in the
workdir). Each stage runs as a fresh process (peak RSS from its rusage), once with the
code of a baseline git revision (extracted with `git archive`) and once with this checkout, on
the same inputs, with the same threads (OMP_NUM_THREADS). `--baseline .` makes the baseline this
checkout too, and `--baseline-device` / `--baseline-dtype` run it on another device or in another
dtype; `--device` may list several devices, each a column against the same baseline: `--baseline .
--baseline-device cpu --baseline-dtype float32 --device cuda,cpu` compares a GPU and the CPU's
--compute-dtype auto (bfloat16 where it has matrix units) with the CPU's float32 (peak GPU memory is
reported as well):

- build: a gate-less MoE, written (the merge itself);
- hidden: hidden-state routers (router.mode hidden) from max_tokens of each expert's text;
- domain: objective domain, init zeros, --domain-steps per layer;
- lm: objective lm, init zeros, --lm-steps steps (per-step time from the optimizer's steps);
- eval: `eval` of a top-2 MoE on held-out text of every domain.

Routers and perplexities of both runs are compared (the same result, not only the same time).
With --depths, hidden and lm also run on the same models cut or repeated to 8, 16, 32 layers
(this checkout only, unless --depth-baseline): their peak RSS should stay flat. Run by hand:

    python benchmarks/bench_real.py [--workdir DIR] [--baseline REV|.] [--stages build,hidden,domain,lm,eval]
        [--depths 8,16,32] [--threads 1] [--device cpu[,cuda]] [--baseline-device DEV] [--baseline-dtype DTYPE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
STAGES = ("build", "hidden", "domain", "lm", "eval")
# The last commit before issue 13's work: what "the current main" was when it started.
DEFAULT_BASELINE = "a7a8b5c"


def recipe(suite, router: dict, max_tokens: int) -> dict:
    return {"base_model": str(suite.base), "experts": suite.expert_entries(),
            "router": {**router, "max_tokens": max_tokens}}


def stage_recipes(suite, args, lm_steps: int | None = None) -> dict[str, dict]:
    top2 = {"experts_per_token": 2}
    return {
        "build": recipe(suite, {"mode": "gateless"}, args.max_tokens),
        "hidden": recipe(suite, {"mode": "hidden", **top2}, args.max_tokens),
        "domain": recipe(suite, {"mode": "trained", **top2, "train": {
            "objective": "domain", "init": "zeros", "steps": args.domain_steps}}, args.max_tokens),
        "lm": recipe(suite, {"mode": "trained", **top2, "train": {
            "objective": "lm", "init": "zeros", "steps": lm_steps or args.lm_steps}}, args.max_tokens),
        "eval": recipe(suite, {"mode": "noisy", **top2}, args.max_tokens),  # the MoE eval measures
    }


# -- the child: one stage, in the implementation PYTHONPATH names

def run_stage(stage: str, recipe_file: Path, out: Path, device: str, dtype: str, data: list[str]) -> None:
    import dataclasses
    import inspect

    import torch

    stamps: list[float] = []
    step = torch.optim.Adam.step

    def timed_step(self, *a, **k):  # the optimizer's steps time the training, whatever the code
        result = step(self, *a, **k)
        stamps.append(time.perf_counter())
        return result

    torch.optim.Adam.step = timed_step
    if dtype == "auto":  # only this checkout offers it
        from mergekit_mode.build import compute_dtype

        dtype = str(compute_dtype("auto", torch.device(device))).removeprefix("torch.")
    start = time.perf_counter()
    report: dict = {}
    floor: Callable[[], float] | None = None  # the stage's float32 matmul floor, if it has one
    if stage == "build":
        from mergekit_mode.cli import main

        try:
            main([str(recipe_file), str(out), "-q", "--force", *(["--device", device] if device != "cpu" else [])])
        except SystemExit as e:
            if e.code:
                raise
    elif stage == "eval":
        from mergekit_mode.evaluate import evaluate, parse_data

        # what the implementation offers (a baseline may predate quiet and the compute dtype)
        kwargs = {"quiet": True, "dtype": getattr(torch, dtype)}
        kwargs = {k: v for k, v in kwargs.items() if k in inspect.signature(evaluate).parameters}
        results = evaluate(out, parse_data(tuple(data)), ctx=128, batch_size=8, device=torch.device(device), **kwargs)
        report["perplexity"] = {d: r.perplexity for d, r in results.items()}
        floor = lambda: matmul_floor(json.loads((out / "config.json").read_text()),  # noqa: E731
                                     sum(r.tokens for r in results.values()))
    else:
        from mergekit_mode.build import plan_recipe
        from mergekit_mode.routers import RouterContext, make_routers

        plan = plan_recipe(recipe_file)
        has_dtype = "dtype" in {f.name for f in dataclasses.fields(RouterContext)}
        kwargs = {"dtype": getattr(torch, dtype)} if has_dtype else {}
        routers = make_routers(plan, RouterContext(torch.device(device), quiet=True, **kwargs))
        routers = getattr(routers, "routers", routers)  # Gates since issue 12, a list before
        torch.save([r.float() for r in routers], out)
        if stage == "hidden":
            floor = lambda: hidden_floor(plan)  # noqa: E731
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    report["seconds"] = time.perf_counter() - start
    if device.startswith("cuda"):
        report["gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    elif floor is not None:  # after the timing: neither its matmuls nor its tokenizing are the stage's (a CPU's)
        report["floor"] = floor()
    if len(stamps) > 1:
        report["first_step"] = stamps[0] - start
        report["per_step"] = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    print("STAGE " + json.dumps(report))


def hidden_floor(plan) -> float:
    """matmul_floor of the hidden-state pass: every router token through the base, no LM head, no
    MLP in the last layer. Both revisions tokenize the router text with routers.calibration."""
    from mergekit_mode.routers import calibration

    tokens = sum(len(s) for t in calibration(plan) for s in t.train + t.negative)
    cfg = json.loads((Path(plan.recipe.recipe.base_model) / "config.json").read_text())
    return matmul_floor(cfg, tokens, head=False, mlp_layers=cfg["num_hidden_layers"] - 1)


def matmul_floor(cfg: dict, tokens: int, chunk: int = 1024, repeats: int = 3, head: bool = True,
                 mlp_layers: int | None = None) -> float:
    """Seconds that the float32 matmuls of a forward over `tokens` tokens take here, and nothing else
    (attention projections, each token's k experts or the dense MLP, the LM head if `head`; no
    attention scores, norms, activations, reads or loss): what no implementation can beat on this
    CPU without doing less arithmetic or doing it in a faster dtype. `mlp_layers`: how many layers'
    MLPs the stage needs (hidden states need none in the last layer). Timed in the stage's own
    process."""
    import torch
    import torch.nn.functional as F

    h = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    attention = [(q, h), (kv, h), (kv, h), (h, q)]
    mlp = [(inter, h), (inter, h), (h, inter)] * cfg.get("num_experts_per_tok", 1)
    lm_head = [(cfg["vocab_size"], h)] if head else []
    weights = {s: torch.randn(*s) for s in {*attention, *mlp, *lm_head}}
    inputs = {n: torch.randn(chunk, n) for n in {h, q, inter}}

    def seconds(shapes: list[tuple[int, int]]) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for shape in shapes:
                F.linear(inputs[shape[1]], weights[shape])
            best = min(best, time.perf_counter() - start)
        return best

    layers = cfg["num_hidden_layers"]
    mlp_layers = layers if mlp_layers is None else mlp_layers
    total = seconds(attention) * layers + seconds(mlp) * mlp_layers + (seconds(lm_head) if head else 0.0)
    return total * tokens / chunk


# -- the parent

def stage_run(cmd: list[str], env: dict) -> tuple[float, float, dict]:
    """(wall seconds, peak RSS GB, the stage's own report) of a fresh process."""
    from bench_merge import timed

    wall, rss, stdout = timed(cmd, env=env)
    return wall, rss, json.loads(re.search(r"^STAGE (.*)$", stdout, re.M).group(1))


def baseline_tree(work: Path, rev: str) -> Path:
    """The baseline revision's source tree (git archive), extracted once."""
    sha = subprocess.run(["git", "rev-parse", rev], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    tree = work / f"baseline-{sha[:10]}"
    if not (tree / "mergekit_mode").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha, "mergekit_mode"], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


class Runner:
    def __init__(self, args, work: Path, trees: dict[str, Path]) -> None:
        self.args, self.work, self.trees = args, work, trees

    def stage(self, impl: str, stage: str, suite, tag: str = "", lm_steps: int | None = None,
              device: str | None = None) -> tuple[float, float, dict, Path]:
        import yaml

        args = self.args
        device = device or (args.baseline_device if impl == "baseline" else args.device)
        folder = self.work / "runs" / f"{impl}-{device.replace(':', '')}{tag}"
        folder.mkdir(parents=True, exist_ok=True)
        recipe_file = folder / f"{stage}.yml"
        recipe_file.write_text(yaml.safe_dump(stage_recipes(suite, args, lm_steps)[stage], sort_keys=False))
        out = folder / (f"{stage}-out" if stage == "build" else f"{stage}.pt")
        data: list[str] = []
        if stage == "eval":  # the MoE to evaluate is built beforehand (not timed), by this checkout
            out = self.work / "runs" / f"eval-moe{tag}"
            if not (out / "config.json").exists():
                eval_recipe = folder / "eval-moe.yml"
                eval_recipe.write_text(yaml.safe_dump(stage_recipes(suite, args)["eval"], sort_keys=False))
                subprocess.run([sys.executable, "-m", "mergekit_mode", str(eval_recipe), str(out), "-q", "--force"],
                               check=True, env=self.env("new"))
            data = [f"{d}={p}" for d, p in suite.eval_texts.items()]
        dtype = args.baseline_dtype if impl == "baseline" else args.compute_dtype
        cmd = [sys.executable, __file__, "--run-stage", stage, "--recipe", str(recipe_file), "--out", str(out),
               "--device", device, "--dtype", dtype, *(f"--data={d}" for d in data)]
        wall, rss, report = stage_run(cmd, self.env(impl))
        print(f"  {impl:>8} {stage}{tag} on {device}: {wall:.1f} s wall, {report['seconds']:.1f} s in the stage, "
              f"{rss:.2f} GB peak RSS" + (f", {report['per_step']:.2f} s/step" if "per_step" in report else "")
              + (f", {report['gpu_gb']:.2f} GB peak GPU memory" if "gpu_gb" in report else ""),
              file=sys.stderr, flush=True)
        return wall, rss, report, out

    def env(self, impl: str) -> dict:
        path = os.pathsep.join(p for p in (str(self.trees[impl]), os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(self.args.threads),
                "TOKENIZERS_PARALLELISM": "false"}


def floor_ratios(brep: dict, nrep: dict) -> str:
    """Both runs' time over the float32 matmul floor each measured (see matmul_floor), if both ran on
    a CPU."""
    if "floor" not in brep or "floor" not in nrep:
        return ""
    return (f"; time / float32 matmul floor: baseline {brep['seconds'] / brep['floor']:.2f}x, "
            f"new {nrep['seconds'] / nrep['floor']:.2f}x (floor {brep['floor']:.0f} s, {nrep['floor']:.0f} s)")


def compare(a: Path, b: Path) -> str:
    """How far two routers files differ (max |difference| / max |value|)."""
    import torch

    x, y = torch.load(a), torch.load(b)
    scale = max(float(t.abs().max()) for t in x) or 1.0
    return f"{max(float((s - t).abs().max()) for s, t in zip(x, y)) / scale:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mergekit-mode-real",
                    help="models, texts and runs (kept: a second run skips the training of the experts)")
    ap.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare with ('.': this checkout)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--depths", default="8,16,32", help="layer counts for the RSS-in-depth runs ('' for none)")
    ap.add_argument("--depth-baseline", action="store_true",
                    help="run the baseline at every depth too (its lm holds the whole MoE in float32: slow)")
    ap.add_argument("--max-tokens", type=int, default=8000, help="router text per expert (tokens)")
    ap.add_argument("--domain-steps", type=int, default=150)
    ap.add_argument("--lm-steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    ap.add_argument("--device", default="cpu",
                    help="of this checkout's runs, comma-separated for several (the first also fine-tunes the experts)")
    ap.add_argument("--baseline-device", help="of the baseline's runs (default: the first --device)")
    ap.add_argument("--baseline-dtype", choices=["float32", "bfloat16", "auto"],
                    help="of the baseline's runs (default: float32 for a revision, which may predate "
                         "--compute-dtype; --compute-dtype for '.')")
    ap.add_argument("--compute-dtype", default="auto", choices=["float32", "bfloat16", "auto"],
                    help="of this checkout's runs")
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--run-stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--recipe", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_stage:
        return run_stage(args.run_stage, args.recipe, args.out, args.device, args.dtype, args.data)

    sys.path.insert(0, str(Path(__file__).parent))
    import real_model

    devices = args.device.split(",")
    args.device, args.baseline_device = devices[0], args.baseline_device or devices[0]
    args.baseline_dtype = args.baseline_dtype or (args.compute_dtype if args.baseline == "." else "float32")
    work = args.workdir
    suite = real_model.suite(work, device=devices[0])
    runner = Runner(args, work, {"baseline": REPO if args.baseline == "." else baseline_tree(work, args.baseline),
                                 "new": REPO})
    stages = [s for s in args.stages.split(",") if s]
    rows = []
    print(f"real model: {real_model.GGUF} ({real_model.LAYERS} layers), experts {', '.join(real_model.EXPERTS)}; "
          f"{args.threads} thread(s), {os.cpu_count()} cores; baseline {args.baseline} on {args.baseline_device} "
          f"({args.baseline_dtype}), new on {', '.join(devices)} ({args.compute_dtype})", file=sys.stderr)
    for stage in stages:
        base = runner.stage("baseline", stage, suite)
        for device in devices:
            rows.append((stage, device, base, runner.stage("new", stage, suite, device=device)))
    gpu = any("gpu_gb" in rep for _, _, b, n in rows for rep in (b[2], n[2]))
    print("\n| stage | new on | baseline s | new s | speed-up | baseline RSS GB | new RSS GB | RSS ratio |"
          + (" baseline GPU GB | new GPU GB |" if gpu else "") + " same result |")
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if gpu else "") + "---|")
    for stage, device, (bw, br, brep, bout), (nw, nr, nrep, nout) in rows:
        if stage == "eval":
            same = "perplexity rel. diff " + ", ".join(
                f"{d} {abs(nrep['perplexity'][d] / brep['perplexity'][d] - 1):.1e}" for d in brep["perplexity"])
            same += floor_ratios(brep, nrep)
        elif stage == "build":
            same = "-"
        else:
            same = f"routers rel. diff {compare(bout, nout)}"
        if stage == "hidden":
            same += floor_ratios(brep, nrep)
        speed = brep["seconds"] / nrep["seconds"]
        extra = ""
        if "per_step" in brep and "per_step" in nrep and stage == "lm":
            b, n = brep["per_step"], nrep["per_step"]
            extra = f" (per step {b:.2f} -> {n:.2f} s: {b / n:.2f}x)"
        gpu_cells = "".join(f" {rep.get('gpu_gb', 0):.2f} |" for rep in (brep, nrep)) if gpu else ""
        print(f"| {stage} | {device} | {brep['seconds']:.1f} | {nrep['seconds']:.1f} | {speed:.2f}x{extra} | {br:.2f} | {nr:.2f} | "
              f"{nr / br:.2f}x |{gpu_cells} {same} |")
    print("\n(stage seconds: inside the process, after imports; RSS: the whole process, from its rusage; GPU: "
          "torch.cuda.max_memory_allocated)")

    depths = [int(d) for d in args.depths.split(",") if d]
    if depths:
        print("\n| stage | impl | " + " | ".join(f"{d} layers RSS GB" for d in depths) + " |")
        print("|---|---|" + "---|" * len(depths))
        for stage in ("hidden", "lm"):
            for impl in ("baseline", "new") if args.depth_baseline else ("new",):
                cells = []
                for d in depths:
                    _, rss, _, _ = runner.stage(impl, stage, real_model.suite(work, layers=d), tag=f"-L{d}", lm_steps=2)
                    cells.append(f"{rss:.2f}")
                print(f"| {stage} | {impl} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
