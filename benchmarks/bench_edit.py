"""Expert surgery: what `mergekit-mode edit` costs against a full build of the edited recipe, and how
close its trained routers come to a full build's (issue 14).

Trains a tokenizer, a tiny Llama base and four MLP-only domain experts on this machine
(toy.build_domain_suite, one torch thread), then for each router variant:
- builds MoE3 (three experts) and MoE4 (four) with the CLI;
- `edit MoE3 --add` the fourth expert, and `edit MoE4 --drop` it;
- compares each edit with the full build of its recipe: every file's bytes (gateless, noisy,
  hidden), or per-domain perplexity on held-out text (trained), and the wall time of the edit
  against the full build's, measured in the same run on the same machine.

    python benchmarks/bench_edit.py [--workdir DIR] [--steps N] [--only "hidden top-2;noisy top-2"]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
import yaml

from mergekit_mode.cli import main as cli
from mergekit_mode.provenance import RECIPE_FILE
from mergekit_mode.toy import build_domain_suite

TOP2 = {"experts_per_token": 2}
VARIANTS = {
    "gateless": {"mode": "gateless"},
    "noisy top-2": {"mode": "noisy", **TOP2},
    "hidden top-2": {"mode": "hidden", **TOP2},
    "trained top-2, domain": {"mode": "trained", **TOP2, "train": {"objective": "domain"}},
    "trained top-2, lm, init domain": {"mode": "trained", **TOP2, "train": {"objective": "lm", "init": "domain"}},
}


def run_cli(*args: object) -> tuple[str, float]:
    """`mergekit-mode ARGS...` in this process; (what it printed, seconds)."""
    buf = io.StringIO()
    start = time.perf_counter()
    with redirect_stdout(buf):
        try:
            cli([str(a) for a in args])
        except SystemExit as e:
            if e.code:
                raise RuntimeError(f"mergekit-mode {' '.join(map(str, args))} exited {e.code}") from None
    return buf.getvalue(), time.perf_counter() - start


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def perplexities(model: Path, data: dict[str, Path]) -> dict[str, float]:
    out, _ = run_cli("eval", model, *(f"--data={d}={p}" for d, p in data.items()), "--json")
    return {d: r["perplexity"] for d, r in json.loads(out)["domains"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=150, help="pretraining and fine-tuning steps")
    parser.add_argument("--only", help="variants to run, separated by ; (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-edit-"))
    start = time.perf_counter()
    # deterministic from its seeds: the same suite every run (so a kept --workdir gives the same experts)
    suite = build_domain_suite(root / "suite", pretrain_steps=args.steps, finetune_steps=args.steps, num_threads=1)
    print(f"suite: 4 MLP-only experts of a 4-layer Llama (hidden 128), {time.perf_counter() - start:.0f} s")
    names = list(suite.experts)
    kept, extra = names[:3], names[3]

    def recipe(path: Path, experts: list[str], router: dict) -> Path:
        spec = {"base_model": str(suite.base_dir), "router": router,
                "experts": [{"name": d, "model": str(suite.experts[d]), "data": str(suite.train_texts[d])}
                            for d in experts]}
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    rows = []
    chosen = args.only.split(";") if args.only else list(VARIANTS)
    for label, router in ((k, VARIANTS[k]) for k in chosen):
        work = root / label.replace(" ", "_").replace(",", "")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        _, t3 = run_cli(recipe(work / "r3.yml", kept, router), work / "moe3", "-q")
        _, t4 = run_cli(recipe(work / "r4.yml", names, router), work / "moe4", "-q")
        _, t_add = run_cli("edit", work / "moe3", work / "add", "--add", f"{extra}={suite.experts[extra]}",
                           "--data", suite.train_texts[extra], "-q")
        _, t_drop = run_cli("edit", work / "moe4", work / "drop", "--drop", extra, "-q")
        for edit, full, experts, t_edit, t_full in (("add", "moe4", names, t_add, t4),
                                                     ("drop", "moe3", kept, t_drop, t3)):
            # the full build of the edit's own recipe text (moe3/moe4 were built from equivalent recipes)
            (work / f"{edit}-full.yml").write_text((work / edit / RECIPE_FILE).read_text())
            run_cli(work / f"{edit}-full.yml", work / f"{edit}-full", "-q")
            if "trained" in label:
                data = {d: suite.eval_texts[d] for d in experts}
                mine, theirs = perplexities(work / edit, data), perplexities(work / f"{edit}-full", data)
                ratios = [mine[d] / theirs[d] for d in experts]
                same = f"perplexity / full build's: {min(ratios):.4f}-{max(ratios):.4f}"
            else:
                same = "bytes equal" if digest(work / edit) == digest(work / f"{edit}-full") else "BYTES DIFFER"
            rows.append(f"| {label} | {edit} | {same} | {t_edit:.1f} s | {t_full:.1f} s | {t_edit / t_full:.2f} |")
        print(rows[-2], rows[-1], sep="\n", flush=True)
    print("\n| router | edit | NEW against a full build of its recipe | edit | full build | edit / full |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if not args.workdir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
