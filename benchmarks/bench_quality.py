"""Quality: does the mixture serve every domain about as well as its expert, on domains nobody tuned for?

Trains everything on this machine (one torch thread; fixtures.py, cached in --workdir): per fixture a
tokenizer, a tiny Llama base pretrained on the mix of its domains and one MLP-only expert per domain.
Router defaults are chosen on the DEVELOPMENT fixture only; the HELD-OUT fixtures (another generator,
other vocabularies, shapes and numbers of domains) are reported beside it to show whether the choice
carries over.

For every fixture it builds the MoE variants with the real CLI (`mergekit-mode RECIPE OUT`, in
process) and measures with `mergekit-mode eval --json` on held-out text of every domain:
- each variant's perplexity against the base and the domain's own expert (the target);
- for the trained variants, where the loss to the expert comes from: the MoE with routing forced
  from the domain (`eval --oracle-routing`): `topk` keeps the router's weights but puts the domain's
  expert among the k (no misrouting), `top1` runs the domain's expert alone (no mixing either; with
  MLP-only experts it is the expert itself, which the report checks); and the weight each token gives
  its own domain's expert, per layer (`eval --own-weight`).
On the development fixture it also measures full fine-tunes of the same base (attention drifts too).
Writes a report (tables, targets met or missed), its numbers as JSON beside it, and a plot:

    python benchmarks/bench_quality.py [--workdir DIR] [--fixtures a,b] [--md docs/quality.md] [--png docs/quality.png]

Fixtures can run as separate processes (one --fixtures each, its own --md) and be joined into one
report with `--rerender a.json b.json ... --md docs/quality.md`; with the same --workdir, a rerun
reuses the fixtures and every MoE already built from the same recipe.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from fixtures import DEVELOPMENT, FIXTURES, Fixture
from mergekit_mode.cli import main as cli
from mergekit_mode.domain_routing import BINS, router_modules
from mergekit_mode.evaluate import evaluate_domain, load_model, tokenize_domains, windows
from mergekit_mode import formats
from mergekit_mode.formats.families import MLP_ROLES, family_of
from mergekit_mode.toy import DomainSuite, finetune

TOP2 = {"experts_per_token": 2}
DEFAULT = "trained (defaults)"
# name -> router block. Every data mode reads each expert's training text.
BASELINES: dict[str, dict] = {
    "gateless": {"mode": "gateless"},
    "noisy top-2": {"mode": "noisy", **TOP2},
    "hidden top-2": {"mode": "hidden", **TOP2},
}
# The router changes measured against each other on every fixture; DEFAULT is what the recipe gives.
TRAINED: dict[str, dict] = {
    DEFAULT: {"mode": "trained"},
    "trained, old defaults (300 steps, lr 3e-3)": {"mode": "trained", **TOP2,
                                                   "train": {"objective": "domain", "steps": 300, "lr": 3e-3}},
    "trained top-1": {"mode": "trained", "experts_per_token": 1},
    "trained, lm, init domain": {"mode": "trained", **TOP2, "train": {"objective": "lm", "init": "domain"}},
}
VARIANTS = {**BASELINES, **TRAINED}
# Changes tried on the default router after it is built, no recipe option: a temperature (every
# router row scaled), and the base's MLP as a fallback expert (see probe_fallback).
SCALES = (0.5, 2.0)
FALLBACK = "trained (defaults), base MLP as fallback"
# Full fine-tunes moved their attention: a stem merged from the experts is the other lever.
FULL_VARIANTS: dict[str, tuple[dict, dict | None]] = {
    "gateless": ({"mode": "gateless"}, None),
    DEFAULT: (TRAINED[DEFAULT], None),
    "stem linear + trained (defaults)": (TRAINED[DEFAULT], {"merge_method": "linear", "parameters": {"weight": 1.0}}),
}
MARGIN = 1.05  # target: within 5% of the expert
BEST = "best single model"  # per domain, the lowest perplexity of the base and every expert
# Rows that are references, not MoE variants.
REFERENCES = ("base", "own expert", "oracle top-1", BEST)
CLEARLY = 0.98  # an expert "clearly" beats the base: at least 2% lower perplexity on its domain


def run_cli(*args: object) -> str:
    """`mergekit-mode ARGS...` in this process (imports paid once); returns what it printed."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        cli([str(a) for a in args])
    return buf.getvalue()


def evaluate(model: Path, data: dict[str, Path], *extra: str) -> dict[str, dict]:
    out = json.loads(run_cli("eval", model, *(f"--data={d}={p}" for d, p in data.items()), "--json", *extra))
    return out["domains"]


def perplexities(model: Path, data: dict[str, Path], *extra: str) -> dict[str, float]:
    return {d: r["perplexity"] for d, r in evaluate(model, data, *extra).items()}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


@dataclass
class Run:
    """One set of experts of one base: its models and their numbers per domain."""

    label: str
    root: Path
    suite: DomainSuite
    experts: dict[str, Path]
    rows: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> domain -> perplexity
    oracle_topk: dict[str, dict[str, float]] = field(default_factory=dict)  # trained variant -> domain -> ppl
    own_weight: dict[str, dict[str, dict]] = field(default_factory=dict)  # trained variant -> domain -> OwnWeight
    seconds: dict[str, float] = field(default_factory=dict)
    positions: dict[str, list[float]] = field(default_factory=dict)  # domain -> position_gap of the default router
    entries: list[dict] = field(default_factory=list)  # the recipe's experts (default: each expert's folder)

    @property
    def domains(self) -> list[str]:
        return list(self.experts)

    def measure(self, variants: dict[str, tuple[dict, dict | None]], probes: bool = True) -> None:
        held = self.suite.eval_texts
        self.rows["base"] = perplexities(self.suite.base_dir, held)
        self.rows["own expert"] = {d: perplexities(p, {d: held[d]})[d] for d, p in self.experts.items()}
        for name, (router, stem) in variants.items():
            folder = self.build(name, router, stem)
            if router["mode"] != "trained":
                self.rows[name] = perplexities(folder, held)
            else:
                results = evaluate(folder, held, "--own-weight")
                self.rows[name] = {d: r["perplexity"] for d, r in results.items()}
                self.own_weight[name] = {d: r["own_weight"] for d, r in results.items()}
                self.oracle_topk[name] = perplexities(folder, held, "--oracle-routing", "topk")
            if name == DEFAULT:  # the oracle: each domain's expert alone, through the MoE's own forward
                self.rows["oracle top-1"] = perplexities(folder, held, "--oracle-routing", "top1")
                if probes:
                    self.probe(folder)
            print(f"[{self.label}] {name}: built in {self.seconds[name]:.1f} s; "
                  + ", ".join(f"{d} {v / self.rows['own expert'][d]:.3f}" for d, v in self.rows[name].items()),
                  flush=True)

    def probe(self, moe: Path) -> None:
        """The default MoE with each router scaled (a temperature), and with the base MLP as a fallback."""
        routers = router_names(moe)
        for scale in SCALES:
            folder = self.root / "moe" / f"scaled_{scale}"
            rewrite(moe, folder, lambda name, t: t * scale if name in routers else t)
            self.rows[f"{DEFAULT}, router rows x{scale:g}"] = perplexities(folder, self.suite.eval_texts)
            shutil.rmtree(folder)
        self.positions = {d: position_gap(moe, self.experts[d], p) for d, p in self.suite.eval_texts.items()}
        self.rows[FALLBACK] = probe_fallback(moe, self.suite.base_dir, self.root / "moe" / "fallback",
                                             self.suite.eval_texts)

    def build(self, name: str, router: dict, stem: dict | None) -> Path:
        recipe = {
            "base_model": str(self.suite.base_dir),
            "experts": self.entries or [{"name": d, "model": str(p), "data": str(self.suite.train_texts[d])}
                                        for d, p in self.experts.items()],
            "router": router,
        } | ({"stem": stem} if stem else {})
        folder = self.root / "moe" / slug(name)
        folder.parent.mkdir(parents=True, exist_ok=True)
        recipe_file, stamp = folder.with_suffix(".yml"), folder.with_suffix(".seconds")
        text = yaml.safe_dump(recipe, sort_keys=False)
        # A build of the same recipe left in the workdir by an earlier run is reused (builds are
        # deterministic); its build time is the one that run measured.
        if recipe_file.is_file() and recipe_file.read_text() == text and stamp.is_file() and \
                (folder / "config.json").is_file():
            self.seconds[name] = float(stamp.read_text())
            return folder
        recipe_file.write_text(text)
        start = time.perf_counter()
        run_cli(recipe_file, folder, "-q", "--force")
        self.seconds[name] = time.perf_counter() - start
        stamp.write_text(f"{self.seconds[name]:.1f}")
        return folder

    def ratio(self, row: str, domain: str, ref: str = "own expert") -> float:
        return self.rows[row][domain] / self.rows[ref][domain]

    def worst(self, row: str, ref: str = "own expert") -> float:
        return max(self.ratio(row, d, ref) for d in self.domains)

    def missed(self, row: str, ref: str = "own expert") -> list[str]:
        return [d for d in self.domains if self.ratio(row, d, ref) > MARGIN]


def full_finetune(base: Path, out: Path, text: Path, steps: int) -> Path:
    """Every weight fine-tuned; one finished earlier in the workdir with the same steps is reused."""
    stamp = out / "finetune_steps"
    if not (stamp.is_file() and stamp.read_text() == str(steps)):
        finetune(base, out, text.read_text("utf-8"), steps, mlp_only=False, num_threads=1)
        stamp.write_text(str(steps))
    return out


def rewrite(src: Path, dst: Path, change, extra: dict[str, torch.Tensor] | None = None,
            config: dict | None = None) -> None:
    """A copy of the model folder src with each tensor passed through change(name, tensor), `extra`
    tensors added and `config` keys set (weights in one file, the recipe copy dropped)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json",
                                                            "mergekit_mode_recipe.yml"))
    tensors = {k: change(k, v) for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
    save_file({**tensors, **(extra or {})}, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **(config or {})}))


def router_names(moe: Path) -> set[str]:
    cfg = json.loads((moe / "config.json").read_text())
    return {formats.of_config(cfg).router_tensor(layer) for layer in range(cfg["num_hidden_layers"])}


def probe_fallback(moe: Path, base: Path, folder: Path, held: dict[str, Path]) -> dict[str, float]:
    """The base's MLP as one more expert that takes what the router leaves: each token runs its
    router's top expert with the router's softmax probability p and the base MLP with 1 - p (in
    place of the second expert's share). Not expressible as router rows, so it runs the MoE with
    its choice replaced by a hook: an upper bound on what a fallback expert could give."""
    cfg = json.loads((moe / "config.json").read_text())
    fmt = formats.of_config(cfg)
    experts = fmt.num_experts(cfg)
    family = family_of(json.loads((base / "config.json").read_text()), "base")
    dense = {k: v for f in sorted(base.glob("*.safetensors")) for k, v in load_file(f).items()}
    extra = {fmt.expert_tensor(layer, experts, role): dense[family.layer_name(layer, family.mlp(role))]
             for layer in range(int(cfg["num_hidden_layers"])) for role in MLP_ROLES}
    routers = router_names(moe)
    pad = lambda name, t: torch.cat([t, torch.zeros(1, t.shape[1])]) if name in routers else t  # noqa: E731
    rewrite(moe, folder, pad, extra, {fmt.experts_key: experts + 1})
    model = load_model(folder, torch.device("cpu"))

    def fallback(_module, _inputs, out):
        probs = torch.softmax(out[0][:, :experts].float(), dim=-1)
        p, top = probs.max(-1)
        return out[0], torch.stack([p, 1 - p], -1), torch.stack([top, torch.full_like(top, experts)], -1)

    hooks = [r.register_forward_hook(fallback) for r in router_modules(model)]
    streams = tokenize_domains(folder, held)
    result = {d: evaluate_domain(model, ids, 128, 8, torch.device("cpu")).perplexity for d, ids in streams.items()}
    for hook in hooks:
        hook.remove()
    shutil.rmtree(folder)
    return result


EARLY = 16  # tokens at the start of a window, before its context shows the domain


def position_gap(moe: Path, expert: Path, text: Path, ctx: int = 128) -> list[float]:
    """[MoE/expert perplexity over a window's first EARLY predicted tokens, the same over the rest,
    share of the MoE's excess loss that falls on the first EARLY]: is the gap at the start of each
    window (no context to tell the domain from yet) or everywhere? Full windows of ctx tokens, as eval."""
    nll = []
    for model_dir in (moe, expert):
        ids = tokenize_domains(model_dir, {"d": text})["d"]
        rows = torch.tensor([w for w in windows(ids, ctx) if len(w) == ctx])
        model = load_model(model_dir, torch.device("cpu"))
        with torch.no_grad():
            nll.append(torch.cat([
                torch.nn.functional.cross_entropy(model(input_ids=b).logits[:, :-1].transpose(1, 2).float(),
                                                  b[:, 1:], reduction="none") for b in rows.split(8)]))
    excess = nll[0] - nll[1]  # windows x positions
    early, late = excess[:, :EARLY], excess[:, EARLY:]
    return [float(early.mean().exp()), float(late.mean().exp()), float(early.sum() / excess.sum())]


def table(run: Run, rows: list[str], ref: str | None = None) -> list[str]:
    """Markdown table of perplexities, or of ratios to the row `ref`."""
    lines = ["| model | " + " | ".join(run.domains) + " |", "|---" * (len(run.domains) + 1) + "|"]
    for row in rows:
        cells = [f"{run.ratio(row, d, ref):.3f}" if ref else f"{run.rows[row][d]:.3f}" for d in run.domains]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def verdict(missed: list[str], run: Run, row: str, ref: str = "own expert") -> str:
    if not missed:
        return "**met**"
    return "**missed** on " + ", ".join(f"{d} ({run.ratio(row, d, ref):.3f})" for d in missed)


def own_summary(own: dict) -> tuple[float, float, float, float]:
    """(mean over layers of the mean own weight, its lowest layer, most tokens not choosing the
    expert in any layer, most tokens giving it under 0.5 in any layer)."""
    below = [sum(h[:BINS // 2]) for h in own["histogram"]]
    return sum(own["mean"]) / len(own["mean"]), min(own["mean"]), max(own["not_chosen"]), max(below)


def analysis(run: Run) -> list[str]:
    lines = ["| variant | domain | router | oracle top-k | oracle top-1 | own weight: mean (lowest layer) "
             "| not chosen (worst layer) | below 0.5 (worst layer) |", "|---" * 8 + "|"]
    for name in run.oracle_topk:
        for d in run.domains:
            mean, low, zero, below = own_summary(run.own_weight[name][d])
            lines.append(f"| {name} | {d} | {run.ratio(name, d):.3f} | "
                         f"{run.oracle_topk[name][d] / run.rows['own expert'][d]:.3f} | "
                         f"{run.ratio('oracle top-1', d):.3f} | {mean:.3f} ({low:.3f}) | {zero:.3f} | {below:.3f} |")
    return lines


def position_table(run: Run) -> list[str]:
    if not run.positions:
        return []
    lines = [f"Where in the window the default router loses (MoE/expert perplexity on the first {EARLY} predicted "
             f"tokens of each 128-token window, on the rest, and the share of the MoE's excess loss on the first "
             f"{EARLY}, which are {EARLY / 127:.0%} of the tokens):", "",
             f"| domain | first {EARLY} | rest | share of the excess on the first {EARLY} |", "|---|---|---|---|"]
    lines += [f"| {d} | {early:.3f} | {late:.3f} | {share:.0%} |" for d, (early, late, share) in run.positions.items()]
    return lines + [""]


def targets(run: Run) -> list[str]:
    rows = run.rows
    worse = [d for d in run.domains if rows["own expert"][d] > CLEARLY * rows["base"][d]]
    off = off_domain(run)
    lines = [f"- Each expert at least 2% below the base on its own domain: {verdict(worse, run, 'own expert', 'base')} "
             "(expert/base: " + ", ".join(f"{d} {run.ratio('own expert', d, 'base'):.3f}" for d in run.domains)
             + f"); off its domain an expert is {min(off):.2f}x-{max(off):.2f}x the base.",
             "- The oracle (each domain's expert MLP alone, through the MoE) against the expert: largest difference "
             f"{max(abs(run.ratio('oracle top-1', d) - 1) for d in run.domains):.1e} (0 when every expert is "
             "MLP-only; a LoRA expert also moved its attention, which the MoE does not take)."]
    for name in [n for n in TRAINED if n in rows]:
        lines.append(f"- {name} within 5% of each expert on every domain: {verdict(run.missed(name), run, name)}; "
                     f"no worse than the best single model (base or any expert) on every domain: "
                     f"{verdict([d for d in run.domains if run.ratio(name, d, BEST) > 1], run, name, BEST)}.")
    for name in [r for r in model_rows(run) if r not in REFERENCES]:
        below = [d for d in run.domains if rows[name][d] < rows["base"][d]]
        lines.append(f"- {name}: below the base on {len(below)} of {len(run.domains)} domains; worst ratio to "
                     f"the expert {run.worst(name):.3f}.")
    return lines


def off_domain(run: Run) -> list[float]:
    """Each expert's perplexity on the other domains over the base's (measured in Run.measure_off)."""
    return [run.rows[f"expert {e} off-domain"][d] / run.rows["base"][d]
            for e in run.domains for d in run.domains if d != e and f"expert {e} off-domain" in run.rows]


def measure_off_domain(run: Run) -> None:
    """Every expert on the other domains, and from them the best single model of each domain."""
    for e, path in run.experts.items():
        others = {d: p for d, p in run.suite.eval_texts.items() if d != e}
        run.rows[f"expert {e} off-domain"] = perplexities(path, others)
    run.rows[BEST] = best_single(run)


def best_single(run: Run) -> dict[str, float]:
    """Per domain, the lowest perplexity of the base and every expert (on and off its domain)."""
    singles = [r for n, r in run.rows.items() if n in ("base", "own expert") or n.endswith("off-domain")]
    return {d: min(s[d] for s in singles if d in s) for d in run.domains}


def summary(runs: list[tuple[Fixture, Run]]) -> list[str]:
    names = [n for n in dict.fromkeys(m for _, r in runs for m in model_rows(r)) if n not in REFERENCES]
    head = "| variant | " + " | ".join(f"{f.name} ({f.role})" for f, _ in runs) + " |"
    lines = [head, "|---" * (len(runs) + 1) + "|"]
    for name in names:
        cells = ["-" if name not in r.rows else f"{r.worst(name):.3f}" +
                 ("" if not r.missed(name) else f" ({len(r.missed(name))} missed)") for _, r in runs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    # the default router once a window has context (position_gap)
    cells = [f"{max(late for _, late, _ in r.positions.values()):.3f}" if r.positions else "-" for _, r in runs]
    lines.append(f"| {DEFAULT}, tokens after the first {EARLY} of each window | " + " | ".join(cells) + " |")
    cells = [f"{r.worst(DEFAULT, BEST):.3f}" if BEST in r.rows else "-" for _, r in runs]
    lines.append(f"| {DEFAULT}, against the {BEST} (base or any expert; target <= 1.000 on the real model) | "
                 + " | ".join(cells) + " |")
    return lines


def model_rows(run: Run) -> list[str]:
    return [r for r in run.rows if not r.endswith("off-domain")]


def report(runs: list[tuple[Fixture, Run]], full: Run | None, setup: str, timings: list[str], findings: str) -> str:
    dev = [f.name for f, _ in runs if f.role == DEVELOPMENT]
    out = ["# Quality: the mixture against its experts, on domains nobody tuned for", "", setup, "",
           "| fixture | role | what | domains |", "|---|---|---|---|"]
    out += [f"| {f.name} | {f.role} | {f.about} | {', '.join(f.domains)} |" for f, _ in runs]
    out += ["", f"Router defaults were chosen on **{', '.join(dev) or 'no'}** (the development fixture) only; the "
            "held-out fixtures were not used to choose anything.", "",
            "## Summary: worst ratio to the domain's own expert (target <= 1.05)", "", *summary(runs), "",
            findings, ""]
    for fixture, run in runs:
        models = [r for r in model_rows(run) if r not in REFERENCES]
        out += [f"## {fixture.name} ({fixture.role})", "", "Perplexity on held-out text (lower is better):", "",
                *table(run, model_rows(run)), "", "Ratio to the domain's own expert:", "",
                *table(run, ["base", "oracle top-1", *models], "own expert"), "",
                f"Ratio to the {BEST} (per domain, the lowest perplexity of the base and every expert):", "",
                *table(run, ["base", "own expert", *models], BEST), "",
                "Where the trained routers lose to the expert (ratios to the expert): `router` is the MoE as "
                "built, `oracle top-k` the same MoE with the domain's expert forced among the top k at the router's "
                "weights (what remains is soft mixing), `oracle top-1` the domain's expert alone. Own weight: the "
                "weight each token gives its domain's expert (0 when not among the top k), over layers.", "",
                *analysis(run), "", *position_table(run), "Targets:", "", *targets(run), ""]
    if full is not None:
        models = [r for r in model_rows(full) if r not in REFERENCES]
        out += ["## Full fine-tunes (development fixture)", "",
                "The same base and text, every weight fine-tuned: the oracle (base stem + the expert's MLP) is no "
                "longer the expert, since the expert's attention moved too.", "",
                *table(full, model_rows(full)), "", "Ratio to the oracle:", "",
                *table(full, ["base", "own expert", *models], "oracle top-1"), ""]
    out += ["## Time", "", *timings, ""]
    return "\n".join(out)


def plot(runs: list[tuple[Fixture, Run]], path: Path, top: float = 2.0) -> None:
    """Left: per fixture, each model's perplexity over the domain's expert's, grouped by domain (bars
    above `top` cut and labelled). Right: the default router's own-weight histogram per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(19, 4.8 * len(runs)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]})
    cmap = plt.get_cmap("tab20")
    for (ax, hist_ax), (fixture, run) in zip(axes, runs):
        models = [r for r in model_rows(run) if r not in ("own expert", "oracle top-1", BEST)]
        width = 0.85 / len(models)
        for i, model in enumerate(models):
            ratios = [run.ratio(model, d) for d in run.domains]
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(run.domains))]
            ax.bar(xs, [min(r, top) for r in ratios], width, label=model, color=cmap(i % 20))
            for x, r in zip(xs, ratios):
                if r > top:
                    ax.text(x, top, f"{r:.1f}", rotation=90, ha="center", va="top", fontsize=7, color="white")
        ax.axhline(1.0, color="black", linewidth=1, label="own expert")
        ax.axhline(MARGIN, color="black", linewidth=1, linestyle="--", label="expert + 5%")
        ax.set_xticks(range(len(run.domains)), run.domains)
        ax.set_ylabel("perplexity / own expert's")
        ax.set_ylim(min(0.9, min(run.ratio(m, d) for m in models for d in run.domains) - 0.05), top)
        ax.set_title(f"{fixture.name} ({fixture.role}): bars above {top} are cut, value printed")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        edges = [(b + 0.5) / BINS for b in range(BINS)]
        for d in run.domains:
            hist = run.own_weight[DEFAULT][d]["histogram"]
            pooled = [sum(layer[b] for layer in hist) / len(hist) for b in range(BINS)]
            hist_ax.plot(edges, pooled, marker=".", label=d)
        hist_ax.set_yscale("log")
        hist_ax.set_xlabel("weight of the domain's own expert (default router)")
        hist_ax.set_ylabel("share of tokens (all layers)")
        hist_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def to_json(runs: list[tuple[Fixture, Run]], full: Run | None, timings: list[str]) -> dict:
    def numbers(run: Run) -> dict:
        return {"domains": run.domains, "perplexity": run.rows, "oracle_topk": run.oracle_topk,
                "own_weight": run.own_weight, "build_seconds": run.seconds, "positions": run.positions}

    out = {"defaults_chosen_on": [f.name for f, _ in runs if f.role == DEVELOPMENT],
           "fixtures": {f.name: {"role": f.role, "about": f.about, **numbers(r)} for f, r in runs},
           "timings": timings}
    if full is not None:
        out["full_finetunes"] = numbers(full)
    return out


def from_json(*files: Path) -> tuple[list[tuple[Fixture, Run]], Run | None, list[str]]:
    """The runs of one or more reports' JSON (fixtures measured in separate runs), to render them
    as one report (--rerender) without measuring."""
    def run(label: str, numbers: dict) -> Run:
        run = Run(label, Path(), None, dict.fromkeys(numbers["domains"]), numbers["perplexity"],  # type: ignore
                  numbers["oracle_topk"], numbers["own_weight"], numbers["build_seconds"],
                  numbers.get("positions", {}))
        if BEST not in run.rows:  # reports written before the row existed
            run.rows[BEST] = best_single(run)
        return run

    runs, full, timings = [], None, []
    for data in (json.loads(f.read_text()) for f in files):
        runs += [(FIXTURES[name], run(name, numbers)) for name, numbers in data["fixtures"].items()]
        full = run("full fine-tunes", data["full_finetunes"]) if "full_finetunes" in data else full
        timings += data["timings"]
    order = list(FIXTURES)
    return sorted(runs, key=lambda fr: order.index(fr[0].name)), full, timings


SETUP = (
    "Measured by `python benchmarks/bench_quality.py` on this machine (1 torch thread). Each fixture "
    "(benchmarks/fixtures.py) is a tokenizer, a tiny Llama base pretrained on an even mix of its domains and one "
    "MLP-only expert per domain fine-tuned from it (except smollm2: the real model of benchmarks/real_model.py, with two "
    "MLP-only experts and two LoRA adapters); MoEs are built with `mergekit-mode RECIPE OUT`, each router made "
    "from every expert's training text (router.max_tokens 20000 per expert), and perplexity comes from "
    "`mergekit-mode eval --json` on held-out text of each domain (windows of 128 tokens). "
    f"Target: within {MARGIN - 1:.0%} of the domain's own expert, perplexity <= {MARGIN} x the expert's.")


FINDINGS = ("<!-- findings: written by hand, kept when the report is written again -->", "<!-- /findings -->")


def kept_findings(md: Path) -> str:
    """The hand-written reading of the numbers from the report being replaced (between FINDINGS)."""
    text = md.read_text() if md.is_file() else ""
    start, end = text.find(FINDINGS[0]), text.find(FINDINGS[1])
    return text[start:end + len(FINDINGS[1])] if 0 <= start < end else "\n".join(FINDINGS)


def write(runs: list[tuple[Fixture, Run]], full: Run | None, timings: list[str], md: Path, png: Path) -> None:
    md.write_text(report(runs, full, SETUP, timings, kept_findings(md)))
    md.with_suffix(".json").write_text(json.dumps(to_json(runs, full, timings), indent=1) + "\n")
    plot(runs, png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where fixtures (kept and reused) and models are made (default: a temp dir)")
    ap.add_argument("--fixtures", default=",".join(FIXTURES), help="comma-separated fixture names")
    ap.add_argument("--variants", default=";".join(VARIANTS),
                    help=f"semicolon-separated variants to build (must include {DEFAULT!r})")
    ap.add_argument("--no-full", action="store_true", help="skip the full fine-tunes of the development fixture")
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--finetune-steps", type=int, default=150)
    ap.add_argument("--md", type=Path, default=Path("docs/quality.md"),
                    help="the report; its numbers go beside it (.json)")
    ap.add_argument("--png", type=Path, default=Path("docs/quality.png"))
    ap.add_argument("--rerender", nargs="*", type=Path, metavar="JSON",
                    help="write the report from the JSON of earlier runs (default: --md's), no measuring: "
                         "fixtures measured in separate runs become one report")
    args = ap.parse_args()
    if args.rerender is not None:
        write(*from_json(*(args.rerender or [args.md.with_suffix(".json")])), args.md, args.png)
        return
    # One thread: on a shared 2-core machine two threads spin on each other (see toy.train.torch_threads).
    torch.set_num_threads(1)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mkmode-quality-"))
    timings: list[str] = []
    runs: list[tuple[Fixture, Run]] = []
    full = None
    for name in args.fixtures.split(","):
        fixture = FIXTURES[name]
        start = time.perf_counter()
        root = work / "fixtures"
        suite = fixture.build(root, pretrain_steps=args.pretrain_steps,
                              finetune_steps=args.finetune_steps)
        timings.append(f"- {name}: tokenizer, base and {len(fixture.domains)} experts ({args.pretrain_steps} and "
                       f"{args.finetune_steps} steps; 0 s when reused from the workdir): "
                       f"{time.perf_counter() - start:.0f} s")
        run = Run(name, work / "runs" / name, suite, suite.experts, entries=fixture.recipe_experts(root, suite))
        start = time.perf_counter()
        chosen = [n for n in args.variants.split(";") if fixture.variants is None or n in fixture.variants]
        run.measure({n: (VARIANTS[n], None) for n in chosen}, probes=fixture.variants is None)
        measure_off_domain(run)
        builds = ", ".join(f"{n} {s:.1f} s" for n, s in run.seconds.items())
        timings.append(f"- {name}: builds and evals {time.perf_counter() - start:.0f} s (builds: {builds})")
        runs.append((fixture, run))
        if fixture.role == DEVELOPMENT and not args.no_full:
            start = time.perf_counter()
            experts = {d: full_finetune(suite.base_dir, work / "runs" / "full" / "experts" / d, p, args.finetune_steps)
                       for d, p in suite.train_texts.items()}
            full = Run(f"{name}, full fine-tunes", work / "runs" / "full", suite, experts)
            full.measure(FULL_VARIANTS, probes=False)
            timings.append(f"- {name}, full fine-tunes: training, builds and evals {time.perf_counter() - start:.0f} s")
    write(runs, full, timings, args.md, args.png)
    print(f"wrote {args.md} and {args.png} (models in {work})")


if __name__ == "__main__":
    main()
