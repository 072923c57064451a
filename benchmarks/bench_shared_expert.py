"""Qwen2-MoE's shared expert: the base's MLP there (`shared_expert: base`) against none (the default).

Trains a tiny Qwen2 base on a mix of four synthetic domains and one MLP-only expert per domain on this
machine (toy.build_domain_suite, one torch thread, a few minutes on 2 CPU cores), builds Qwen2-MoE
variants with the real CLI for each router and each shared-expert choice, and prints every
model's perplexity on held-out text of every domain (`mergekit-mode eval`), with each MoE's ratio to
the domain's own expert. The block is routed mixture + sigmoid(gate . x) * shared(x): with `none`
the shared term is zero; with `base` the gate starts near 0 (weight 0.5) and only objective lm
trains it. Qwen2-MoE does not rescale the top-k weights, so with top-2 of 4 the routed weights sum
to less than 1 unless the router is confident.

    python benchmarks/bench_shared_expert.py [--workdir DIR] [--md FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import yaml

from mergekit_mode.cli import main as cli
from mergekit_mode.toy import build_domain_suite

TOP2 = {"experts_per_token": 2}
ROUTERS = {
    "gateless": {"mode": "gateless"},
    "noisy top-2": {"mode": "noisy", **TOP2},
    "trained top-2 (lm, init domain)": {"mode": "trained", **TOP2, "train": {"objective": "lm", "init": "domain"}},
}
SHARED = ("none", "base")


def run_cli(*args: object) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        cli([str(a) for a in args])
    return buf.getvalue()


def perplexities(model: Path, data: dict[str, Path]) -> dict[str, float]:
    out = json.loads(run_cli("eval", model, *(f"--data={d}={p}" for d, p in data.items()), "--max-tokens", 8000,
                             "--json"))
    return {d: r["perplexity"] for d, r in out["domains"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None, help="also write the table here (markdown)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-shared-"))
    t0 = time.time()
    suite = build_domain_suite(work, arch="qwen2", num_threads=1)
    trained_s = time.time() - t0
    domains = list(suite.experts)
    rows = {"base": perplexities(suite.base_dir, suite.eval_texts)}
    rows |= {f"expert {d}": perplexities(p, suite.eval_texts) for d, p in suite.experts.items()}
    build_s = {}
    for router_name, router in ROUTERS.items():
        for shared in SHARED:
            name = f"{router_name}, shared {shared}"
            recipe = {"base_model": str(suite.base_dir), "shared_expert": shared, "router": router,
                      "experts": [{"name": d, "model": str(p), "data": str(suite.train_texts[d])}
                                  for d, p in suite.experts.items()]}
            path = work / f"{name.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '')}.yml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            t = time.time()
            run_cli(path, path.with_suffix(""), "-q", "--force")
            build_s[name] = time.time() - t
            rows[name] = perplexities(path.with_suffix(""), suite.eval_texts)
    own = {d: rows[f"expert {d}"][d] for d in domains}
    lines = ["| model | " + " | ".join(domains) + " | mean ratio to the domain's expert |",
             "|---|" + "---|" * (len(domains) + 1)]
    for name, ppl in rows.items():
        ratio = sum(ppl[d] / own[d] for d in domains) / len(domains)
        lines.append(f"| {name} | " + " | ".join(f"{ppl[d]:.2f}" for d in domains) + f" | {ratio:.3f} |")
    text = "\n".join(lines)
    print(text)
    print(f"\ntraining base and experts {trained_s:.0f} s; builds: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in build_s.items()))
    if args.md:
        args.md.write_text(text + "\n")


if __name__ == "__main__":
    main()
