"""Quality: does the mixture serve every domain about as well as its expert? (issue 7)

Trains everything on this machine (one torch thread, a few minutes on 2 CPU cores): a tokenizer and
a tiny Llama base pretrained on a mix of four synthetic domains, then one expert per domain, in two
regimes that share the tokenizer, the base and the data:

- (b) MLP-only fine-tunes (toy.build_domain_suite, mlp_only=True): the experts keep the base's
  attention, so "base stem + the domain's own expert MLP" is the expert itself;
- (a) full fine-tunes of the same base on the same text (toy.train.finetune): attention drifts too.

For each regime it builds MoE variants with the real CLI (`mergekit-mode RECIPE OUT`, in process)
and measures every model with `mergekit-mode eval --json` on held-out text of every domain. The
ORACLE of domain d is the base with expert d's MLP weights copied in (a dense Llama): what a perfect
domain router gives, every token of d on expert d alone. It is a target, not a bound: a top-2 mix of
two MLPs can do better than either, and in regime (a) trained routers do. Writes a report
(tables, ratios, targets met or missed), its numbers as JSON beside it, and a plot:

    python benchmarks/bench_quality.py [--workdir DIR] [--md docs/quality.md] [--png docs/quality.png]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from mergekit_mode.cli import main as cli
from mergekit_mode.toy import build_domain_suite, finetune
from mergekit_mode.toy.tokenizer import copy_tokenizer

TOP2 = {"experts_per_token": 2}
LM_FROM_DOMAIN = {"mode": "trained", **TOP2, "train": {"objective": "lm", "init": "domain"}}
# name -> (router block, stem block or None). Every data mode reads each expert's training text.
VARIANTS: dict[str, tuple[dict, dict | None]] = {
    "gateless": ({"mode": "gateless"}, None),
    "noisy top-2": ({"mode": "noisy", **TOP2}, None),
    "hidden top-2": ({"mode": "hidden", **TOP2}, None),
    "trained top-2, domain": ({"mode": "trained", **TOP2, "train": {"objective": "domain"}}, None),
    "trained top-2, lm": ({"mode": "trained", **TOP2, "train": {"objective": "lm"}}, None),
    "trained top-2, lm, init domain": (LM_FROM_DOMAIN, None),
    "trained top-2, lm, init domain, 800 steps": (
        {**LM_FROM_DOMAIN, "train": {**LM_FROM_DOMAIN["train"], "steps": 800}}, None),
}
# Full fine-tunes moved their attention: a stem merged from the experts is the other lever.
STEM_VARIANTS: dict[str, tuple[dict, dict | None]] = {
    "stem linear + trained top-2, lm, init domain": (
        LM_FROM_DOMAIN, {"merge_method": "linear", "parameters": {"weight": 1.0}}),
}
TRAINED = [name for name in {**VARIANTS, **STEM_VARIANTS} if "trained" in name]
MARGIN = 1.05  # targets: within 5% of the oracle / the expert
CLEARLY = 0.98  # an expert "clearly" beats the base: at least 2% lower perplexity on its domain


def run_cli(*args: object) -> str:
    """`mergekit-mode ARGS...` in this process (imports paid once); returns what it printed."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        cli([str(a) for a in args])
    return buf.getvalue()


def perplexities(model: Path, data: dict[str, Path]) -> dict[str, float]:
    out = json.loads(run_cli("eval", model, *(f"--data={d}={p}" for d, p in data.items()), "--json"))
    return {d: r["perplexity"] for d, r in out["domains"].items()}


def write_oracle(base: Path, expert: Path, out: Path) -> Path:
    """A dense model: the base's weights with the expert's MLP tensors in place of the base's."""
    weights = {k: v for f in sorted(base.glob("*.safetensors")) for k, v in load_file(f).items()}
    mlps = {k: v for f in sorted(expert.glob("*.safetensors")) for k, v in load_file(f).items() if ".mlp." in k}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: mlps.get(k, v) for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    copy_tokenizer(base, out)
    return out


class Regime:
    """One set of experts of the shared base, its models, and their perplexity per domain."""

    def __init__(self, label: str, root: Path, base: Path, experts: dict[str, Path],
                 train: dict[str, Path], held_out: dict[str, Path], entries: list[dict] | None = None) -> None:
        self.label, self.root, self.base, self.experts = label, root, base, experts
        self.train, self.held_out = train, held_out
        # the recipe's experts (default: each expert folder as a model, its training text as data)
        self.entries = entries or [{"name": d, "model": str(p), "data": str(train[d])} for d, p in experts.items()]
        self.rows: dict[str, dict[str, float]] = {}
        self.seconds: dict[str, float] = {}

    def measure(self, variants: dict[str, tuple[dict, dict | None]]) -> None:
        domains = list(self.experts)
        self.rows["base"] = perplexities(self.base, self.held_out)
        self.rows["own expert"] = {d: perplexities(p, {d: self.held_out[d]})[d] for d, p in self.experts.items()}
        self.rows["oracle"] = {
            d: perplexities(write_oracle(self.base, p, self.root / "oracle" / d), {d: self.held_out[d]})[d]
            for d, p in self.experts.items()
        }
        for name, (router, stem) in variants.items():
            recipe = {"base_model": str(self.base), "experts": self.entries,
                      "router": router} | ({"stem": stem} if stem else {})
            folder = self.root / "moe" / name.replace(" ", "_").replace(",", "").replace("+", "")
            folder.parent.mkdir(parents=True, exist_ok=True)
            recipe_file = folder.with_suffix(".yml")
            recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
            start = time.perf_counter()
            run_cli(recipe_file, folder, "-q", "--force")
            self.seconds[name] = time.perf_counter() - start
            self.rows[name] = perplexities(folder, self.held_out)
            print(f"[{self.label}] {name}: built in {self.seconds[name]:.1f} s; "
                  + ", ".join(f"{d} {v:.3f}" for d, v in self.rows[name].items()), flush=True)


def table(regime: Regime, rows: list[str], ref: str | None = None) -> list[str]:
    """Markdown table of perplexities, or of ratios to the row `ref`."""
    domains = list(regime.experts)
    lines = ["| model | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    for row in rows:
        values = regime.rows[row]
        cells = [f"{values[d] / regime.rows[ref][d]:.3f}" if ref else f"{values[d]:.3f}" for d in domains]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def within(regime: Regime, row: str, ref: str, margin: float) -> list[str]:
    """Domains where `row` misses `margin` x `ref`."""
    return [d for d in regime.experts if regime.rows[row][d] > margin * regime.rows[ref][d]]


def verdict(missed: list[str]) -> str:
    return "**met**" if not missed else f"**missed** on {', '.join(missed)}"


def targets(regime: Regime, mlp_only: bool) -> list[str]:
    rows = regime.rows
    worse = [d for d in regime.experts if rows["own expert"][d] > CLEARLY * rows["base"][d]]
    lines = [f"- Each expert at least 2% below the base on its own domain: {verdict(worse)} "
             "(expert/base: " + ", ".join(f"{d} {rows['own expert'][d] / rows['base'][d]:.3f}"
                                          for d in regime.experts) + ")."]
    oracle_below = [d for d in regime.experts if rows["oracle"][d] < rows["base"][d]]
    lines.append(f"- The oracle itself: below the base on {len(oracle_below)} of {len(regime.experts)} domains; "
                 "ratio to the own expert " + ", ".join(f"{d} {rows['oracle'][d] / rows['own expert'][d]:.3f}"
                                                       for d in regime.experts)
                 + ".")
    for name in [n for n in TRAINED if n in rows]:
        missed = within(regime, name, "oracle", MARGIN)
        lines.append(f"- {name} within 5% of the oracle on every domain: {verdict(missed)}.")
        if mlp_only:
            lines.append(f"- {name} within 5% of each expert on every domain: "
                         f"{verdict(within(regime, name, 'own expert', MARGIN))}.")
    for name in [r for r in rows if r not in ("base", "own expert", "oracle")]:
        below = [d for d in regime.experts if rows[name][d] < rows["base"][d]]
        lines.append(f"- {name}: below the base on {len(below)} of {len(regime.experts)} domains"
                     f"{' (' + ', '.join(below) + ')' if below else ''}; worst ratio to the oracle "
                     f"{max(rows[name][d] / rows['oracle'][d] for d in regime.experts):.3f}.")
    return lines


def report(regimes: list[tuple[Regime, bool]], setup: str, timings: list[str]) -> str:
    out = ["# Quality: the mixture against its experts", "", setup, ""]
    for regime, mlp_only in regimes:
        models = [r for r in regime.rows if r not in ("base", "own expert", "oracle")]
        out += [f"## {regime.label}", "", "Perplexity on held-out text (lower is better):", "",
                *table(regime, list(regime.rows)), "",
                "Ratio to the oracle (base stem + the domain's own expert MLP: every token on its domain's "
                "expert alone):", "", *table(regime, ["base", "own expert", *models], "oracle"), ""]
        if not mlp_only:
            out += ["Ratio to the domain's own expert:", "",
                    *table(regime, ["base", "oracle", *models], "own expert"), ""]
        out += ["Targets:", "", *targets(regime, mlp_only), ""]
    out += ["## Time", "", *timings, ""]
    return "\n".join(out)


def plot(regimes: list[tuple[Regime, bool]], path: Path, top: float = 2.0) -> None:
    """Per regime: each model's perplexity divided by the oracle's, grouped by domain. Bars above
    `top` are cut there and labelled with their value, so the differences near 1.0 stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(regimes), 1, figsize=(15, 5 * len(regimes)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (regime, _) in zip(axes[:, 0], regimes):
        models = [r for r in regime.rows if r != "oracle"]
        domains = list(regime.experts)
        width = 0.85 / len(models)
        for i, model in enumerate(models):
            ratios = [regime.rows[model][d] / regime.rows["oracle"][d] for d in domains]
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(domains))]
            ax.bar(xs, [min(r, top) for r in ratios], width, label=model, color=cmap(i % 10))
            for x, r in zip(xs, ratios):
                if r > top:
                    ax.text(x, top, f"{r:.1f}", rotation=90, ha="center", va="top", fontsize=7, color="white")
        ax.axhline(1.0, color="black", linewidth=1, label="oracle")
        ax.axhline(MARGIN, color="black", linewidth=1, linestyle="--", label="oracle + 5%")
        ax.set_xticks(range(len(domains)), [f"{d}\n(oracle perplexity {regime.rows['oracle'][d]:.2f})"
                                            for d in domains])
        ax.set_ylabel("perplexity / oracle's (lower is better)")
        low = min(regime.rows[m][d] / regime.rows["oracle"][d] for m in models for d in domains)
        ax.set_ylim(min(0.9, low - 0.05), top)
        ax.set_title(f"{regime.label}: bars above {top} are cut, value printed")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# The real model's variants: fewer, with fewer steps (a step of lm training there is seconds, not ms).
REAL_VARIANTS: dict[str, tuple[dict, dict | None]] = {
    "gateless": ({"mode": "gateless"}, None),
    "hidden top-2": ({"mode": "hidden", **TOP2}, None),
    "trained top-2, domain": ({"mode": "trained", **TOP2, "train": {"objective": "domain", "steps": 100}}, None),
    "trained top-2, lm, init domain": (
        {**LM_FROM_DOMAIN, "train": {**LM_FROM_DOMAIN["train"], "steps": 40}}, None),
}


def real_regime(work: Path) -> Regime:
    """SmolLM2-135M with two MLP-only and two LoRA experts (benchmarks/real_model.py); each expert's
    own perplexity is its merged full model's."""
    import real_model

    suite = real_model.suite(work)
    entries = [{**e, "max_tokens": 4000} for e in suite.expert_entries()]
    return Regime("Regime (real): SmolLM2-135M, 2 MLP-only + 2 LoRA experts", work / "quality", suite.base,
                  {d: suite.full_model(d) for d in suite.experts}, suite.train_texts, suite.eval_texts, entries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="where models are made (default: a temp dir)")
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--finetune-steps", type=int, default=150)
    ap.add_argument("--md", type=Path, default=Path("docs/quality.md"),
                    help="the report; its numbers go beside it (.json)")
    ap.add_argument("--png", type=Path, default=Path("docs/quality.png"))
    ap.add_argument("--real", type=Path, default=None, metavar="DIR",
                    help="also measure the real-model regime (real_model.py's models, made or reused in DIR)")
    args = ap.parse_args()
    # One thread: on a shared 2-core machine two threads spin on each other (see toy.train.torch_threads).
    torch.set_num_threads(1)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mkmode-quality-"))
    timings = []
    start = time.perf_counter()
    suite = build_domain_suite(work / "mlp-only", pretrain_steps=args.pretrain_steps,
                               finetune_steps=args.finetune_steps, mlp_only=True)
    timings.append(f"- tokenizer, base ({args.pretrain_steps} steps) and 4 MLP-only experts "
                   f"({args.finetune_steps} steps each): {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    full = {d: finetune(suite.base_dir, work / "full" / "experts" / d, p.read_text(encoding="utf-8"),
                        args.finetune_steps, mlp_only=False) for d, p in suite.train_texts.items()}
    timings.append(f"- 4 full fine-tunes of the same base ({args.finetune_steps} steps each): "
                   f"{time.perf_counter() - start:.0f} s")
    regimes = [
        (Regime("Regime (b): MLP-only fine-tunes", work / "mlp-only", suite.base_dir, suite.experts,
                suite.train_texts, suite.eval_texts), True),
        (Regime("Regime (a): full fine-tunes", work / "full", suite.base_dir, full,
                suite.train_texts, suite.eval_texts), False),
    ]
    if args.real:
        regimes.append((real_regime(args.real), False))
    for regime, mlp_only in regimes:
        start = time.perf_counter()
        regime.measure(REAL_VARIANTS if regime.label.startswith("Regime (real)") else
                       VARIANTS if mlp_only else {**VARIANTS, **STEM_VARIANTS})
        builds = ", ".join(f"{n} {s:.1f} s" for n, s in regime.seconds.items())
        timings.append(f"- {regime.label}: builds and evals {time.perf_counter() - start:.0f} s (builds: {builds})")
    setup = (
        f"Measured by `python benchmarks/bench_quality.py` on this machine ({torch.get_num_threads()} torch thread). "
        "A 4-layer Llama (hidden 128, vocab 512) pretrained on an even mix of four synthetic domains, one expert "
        "per domain fine-tuned from it (both regimes: same tokenizer, base and text), MoEs built with "
        "`mergekit-mode RECIPE OUT`, each router made from every expert's training text (router.max_tokens 20000 "
        "per expert), and perplexity from `mergekit-mode eval --json` on held-out text of each domain (windows of "
        "128 tokens). The oracle of a domain is the base with that domain's expert MLPs copied in: what a perfect "
        "domain router gives, every token on its domain's expert alone (in regime (b) it is the expert itself, "
        "which the equal rows check). It is a target, not a bound: a top-2 mix of two MLPs can beat either. "
        f"Targets: within {MARGIN - 1:.0%} means "
        f"perplexity <= {MARGIN} x the reference."
    )
    args.md.write_text(report(regimes, setup, timings))
    args.md.with_suffix(".json").write_text(json.dumps({r.label: r.rows for r, _ in regimes}, indent=1) + "\n")
    plot(regimes, args.png)
    print(f"wrote {args.md} and {args.png} (models in {work})")


if __name__ == "__main__":
    main()
