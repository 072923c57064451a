"""The quality gate (`mergekit-mode check`, and a recipe's `checks:` that a build runs before its
output is renamed into place).

A merged MoE can load and still be worse than what it was made from on some domain (mergekit's
users find out afterwards). A check measures each domain's held-out perplexity on the model and on
a reference, and fails the domains whose ratio is above `max_ratio`: against `experts`, a domain's
reference is the expert of the same name (an adapter expert merged into its weights in memory by
peft's own `merge_and_unload()`, nothing written); against `base`, the base model. The text is
tokenized once with the model's tokenizer, which the audit made equal to every expert's, and
scored exactly as `eval` scores it (fixed non-overlapping windows), so the numbers compare.
Models are loaded one at a time.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from mergekit_mode.errors import CheckFailed, ModeError
from mergekit_mode.recipe import CheckSpec, ExpertSpec, LoadedRecipe


@dataclass(frozen=True)
class DomainCheck:
    domain: str
    reference: str  # "expert NAME" or "base"
    perplexity: float
    reference_perplexity: float
    tokens: int
    max_ratio: float

    @property
    def ratio(self) -> float:
        return self.perplexity / self.reference_perplexity

    @property
    def passed(self) -> bool:
        return self.ratio <= self.max_ratio


@dataclass(frozen=True)
class CheckReport:
    against: str
    max_ratio: float
    domains: tuple[DomainCheck, ...]

    @property
    def failed(self) -> list[DomainCheck]:
        return [d for d in self.domains if not d.passed]

    @property
    def passed(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        what = "its expert" if self.against == "experts" else "the base"
        if self.passed:
            return f"passed: every domain within {self.max_ratio:g}x the perplexity of {what}"
        names = ", ".join(d.domain for d in self.failed)
        return (f"{len(self.failed)} of {len(self.domains)} domains above {self.max_ratio:g}x the perplexity of "
                f"{what}: {names}")

    def table(self) -> str:
        """One row per domain; failing rows end in FAIL."""
        width = max(len(d.domain) for d in [*self.domains, DomainCheck("domain", "", 1, 1, 0, 1)])
        ref = max(len(d.reference) for d in [*self.domains, DomainCheck("", "reference", 1, 1, 0, 1)])
        lines = [f"{'domain':<{width}}  {'perplexity':>10}  {'reference':<{ref}}  {'ref. ppl':>10}  {'ratio':>7}  "
                 f"max {self.max_ratio:g}"]
        lines += [f"{d.domain:<{width}}  {d.perplexity:>10.3f}  {d.reference:<{ref}}  {d.reference_perplexity:>10.3f}  "
                  f"{d.ratio:>7.3f}  {'ok' if d.passed else 'FAIL'}" for d in self.domains]
        return "\n".join(lines + [self.summary()])

    def to_json(self) -> dict:
        domains = {d.domain: {**{k: v for k, v in asdict(d).items() if k not in ("domain", "max_ratio")},
                              "ratio": d.ratio, "passed": d.passed} for d in self.domains}
        return {"against": self.against, "max_ratio": self.max_ratio, "passed": self.passed, "domains": domains}


Loader = Callable[[torch.device], torch.nn.Module]


def _expert_loader(loaded: LoadedRecipe, index: int, spec: ExpertSpec) -> Loader:
    """The expert as it was trained: its fine-tune, or its adapter merged by peft in memory."""

    def load(device: torch.device) -> torch.nn.Module:
        from mergekit_mode.evaluate import load_model

        start = loaded.resolve(spec.model if spec.model is not None else loaded.recipe.base_model)
        field = f"experts[{index}].model" if spec.model is not None else "base_model"
        model = load_model(start, device, field)
        if spec.adapter is None:
            return model
        from peft import PeftModel

        from mergekit_mode.adapters import AdapterFolder

        folder = loaded.resolve(spec.adapter)
        AdapterFolder.open(folder, f"experts[{index}].adapter")  # validated (and no pickle) before peft reads it
        return PeftModel.from_pretrained(model, folder).merge_and_unload().eval()

    return load


def references(loaded: LoadedRecipe, against: str, domains: list[str], where: str) -> dict[str, tuple[str, Loader]]:
    """Each domain's reference (label, loader): the expert of the same name, or the base."""
    recipe = loaded.recipe
    if against == "base":
        from mergekit_mode.evaluate import load_model

        base = loaded.resolve(recipe.base_model)

        def load_base(device: torch.device) -> torch.nn.Module:
            return load_model(base, device, "base_model")

        return {d: ("base", load_base) for d in domains}
    experts = {name: (i, spec) for i, (name, spec) in enumerate(zip(recipe.expert_names, recipe.experts))}
    refs = {}
    for domain in domains:
        if domain not in experts:
            raise ModeError(f"{where}: domain {domain!r} is not an expert of the model ({', '.join(experts)}); name "
                            "each domain after its expert, or check against the base")
        refs[domain] = (f"expert {domain}", _expert_loader(loaded, *experts[domain]))
    return refs


@contextlib.contextmanager
def _quiet_loading(quiet: bool) -> Iterator[None]:
    """-q also silences transformers' own "Loading weights" bars while models load."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_enabled:
            hf_logging.enable_progress_bar()


def run_check(model_dir: Path, loaded: LoadedRecipe, spec: CheckSpec, *, device: torch.device,
              quiet: bool = False, where: str = "--data") -> CheckReport:
    """Perplexity of every domain on the model and on its reference; the report says which fail. The
    model runs one decoder layer at a time where its format allows (evaluate_streams), so checking a
    MoE of several 7B experts does not hold all of them in float32; each reference is one dense model."""
    from mergekit_mode.evaluate import check_ctx, evaluate_domain, evaluate_streams, tokenize_domains

    check_ctx(spec.ctx)
    data = {name: loaded.resolve(path) for name, path in spec.data.items()}
    refs = references(loaded, spec.against, list(data), where)
    streams = tokenize_domains(model_dir, data, spec.max_tokens)
    by_loader: dict[Loader, list[str]] = {}  # each reference model is loaded once
    for domain, (_, load) in refs.items():
        by_loader.setdefault(load, []).append(domain)

    with tqdm(total=2 * len(data), desc="Checking", unit="eval", disable=quiet, leave=False, file=sys.stderr) as bar, \
            _quiet_loading(quiet):
        def scores(load: Loader, domains: list[str]) -> dict:
            model = load(device)
            out = {}
            for domain in domains:
                out[domain] = evaluate_domain(model, streams[domain], spec.ctx, spec.batch_size, device)
                bar.update()
            return out

        mine = evaluate_streams(model_dir, streams, ctx=spec.ctx, batch_size=spec.batch_size, device=device,
                                quiet=True)
        bar.update(len(mine))
        theirs = {}
        for load, domains in by_loader.items():
            theirs.update(scores(load, domains))
    return CheckReport(spec.against, spec.max_ratio, tuple(
        DomainCheck(d, refs[d][0], mine[d].perplexity, theirs[d].perplexity, mine[d].tokens, spec.max_ratio)
        for d in data))


def missing_data(loaded: LoadedRecipe) -> None:
    """Every `checks:` data file must exist before a build starts (`validate` reports it)."""
    for i, check in enumerate(loaded.recipe.checks):
        for name, path in check.data.items():
            if not loaded.resolve(path).is_file():
                raise ModeError(f"checks[{i}].data.{name}: {loaded.resolve(path)} does not exist")


def run_recipe_checks(loaded: LoadedRecipe, folder: Path, device: torch.device, quiet: bool) -> tuple[CheckReport, ...]:
    """The recipe's `checks:` on the model in `folder` (the build's staging folder)."""
    return tuple(run_check(folder, loaded, spec, device=device, quiet=quiet, where=f"checks[{i}].data")
                 for i, spec in enumerate(loaded.recipe.checks))


def gate(reports: tuple[CheckReport, ...], out: Path, kept: bool) -> None:
    """Raise CheckFailed (exit code 1) when a check failed, saying what became of `out`."""
    failed = [(i, r) for i, r in enumerate(reports) if not r.passed]
    if not failed:
        return
    what = "; ".join(f"checks[{i}]: {r.summary()}" for i, r in failed)
    fate = f"{out} kept for inspection" if kept else f"nothing written to {out} (--keep-failed keeps it)"
    raise CheckFailed(f"{what}; {fate}", reports)
