"""`mergekit-mode sweep`: one recipe built with several router modes, evaluated side by side.

The paper's advice is that no router wins everywhere (gate-less is best with few strong experts,
trained routers help some domains), so a validation run picks the variant. A sweep builds each
mode of one recipe into OUT/<mode>/ and prints the per-domain perplexity of all of them in one
table. The recipe's router block is kept where its settings apply to a mode (top-k, seed, std for
noisy, pooling and data limits for the data modes, train for trained) and dropped where they would
be refused or ignored.

What is shared and what is recomputed: every variant is planned (headers only) and its output
folder checked before anything is built, so a recipe that cannot make some mode fails in a second;
the held-out text is tokenized once (every variant carries the base's tokenizer). A domain named
after an expert is also scored on that expert, the target a MoE is measured against
(docs/quality.md): the table then shows each variant's ratio to it. Each variant is
a complete model, so its shared tensors are read and written again, and the data modes each
tokenize the experts' text and run the base themselves (trained's hidden init is computed on its
training split, which differs from hidden's rows, so it is not reused).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from mergekit_mode.build import check_apart, compute_dtype, parse_device, write_model
from mergekit_mode.errors import ModeError
from mergekit_mode.evaluate import DomainResult, check_ctx, evaluate_streams, tokenize_domains
from mergekit_mode.plan import BASE, Plan, build_plan
from mergekit_mode.recipe import ExpertData, LoadedRecipe, load_recipe, parse_recipe
from mergekit_mode.router_modes import APPLIES, DATA_MODES, MODE_NAMES as MODES
from mergekit_mode.safety import check_name_lengths
from mergekit_mode.writer import check_destination


def parse_modes(value: str) -> list[str]:
    """`gateless,noisy,...` -> the modes, in order; unknown or repeated names are user errors."""
    modes = [m.strip() for m in value.split(",") if m.strip()]
    if not modes:
        raise ModeError("--router: give at least one mode")
    for mode in modes:
        if mode not in MODES:
            raise ModeError(f"--router: {mode!r} is not a router mode ({', '.join(MODES)})")
    if len(set(modes)) != len(modes):
        raise ModeError(f"--router: a mode is given twice in {value!r}")
    return modes


def variant(loaded: LoadedRecipe, mode: str) -> LoadedRecipe:
    """The recipe with router.mode set to `mode` and the router settings that do not apply dropped
    (and, for modes that use no data, the experts' data settings).

    Built from the recipe's own YAML, so everything else is exactly what the user wrote; paths
    still resolve against the recipe's folder."""
    data = yaml.safe_load(loaded.text)
    router = {k: v for k, v in (data.get("router") or {}).items() if k != "mode" and mode in APPLIES.get(k, MODES)}
    data["router"] = {"mode": mode, **router}
    data.pop("checks", None)  # the sweep's table is the comparison; one failing variant must not stop it
    if mode not in DATA_MODES:  # the built model's recipe should not claim text it was not made from
        data["experts"] = [{k: v for k, v in e.items() if k not in ExpertData.model_fields}
                           if isinstance(e, dict) else e for e in data.get("experts") or []]
    text = yaml.safe_dump(data, sort_keys=False)
    return LoadedRecipe(recipe=parse_recipe(data, f"{loaded.path} (router {mode})"), path=loaded.path, text=text)


def plan_variants(recipe_path: Path, modes: list[str], out: Path, force: bool, data: dict[str, Path] | None = None,
                  *, replace_foreign: bool = False) -> dict[str, Plan]:
    """Every variant planned and its OUT/<mode> checked (apart from every input and --data file,
    replaceable), before any is built or OUT is made."""
    loaded = load_recipe(recipe_path)
    if out.is_symlink():
        raise ModeError(f"{out}: output path is a symlink; give the real folder")
    if out.exists() and not out.is_dir():
        raise ModeError(f"{out}: exists and is not a folder")
    if not out.absolute().parent.is_dir():
        raise ModeError(f"{out}: parent folder {out.absolute().parent} does not exist")
    also_read = {f"--data {name}": path for name, path in (data or {}).items()}
    plans = {}
    for mode in modes:
        recipe = variant(loaded, mode)  # its errors name the recipe and the mode already
        try:
            plans[mode] = build_plan(recipe)
        except ModeError as e:
            raise ModeError(f"{recipe_path} (router {mode}): {e}") from None
        check_apart(plans[mode], out / mode, also_read)
        if out.is_dir():
            check_destination(out / mode, force, 0, replace_foreign=replace_foreign)
        else:
            check_name_lengths(out / mode, "OUT")
    return plans


@dataclass(frozen=True)
class SweepResults:
    """{mode: {domain: result}}, and each domain's own expert where one has the domain's name."""

    variants: dict[str, dict[str, DomainResult]]
    experts: dict[str, DomainResult]


def expert_folders(plan: Plan, domains: list[str]) -> dict[str, Path]:
    """The fine-tuned experts named like a domain: that domain's reference. (An adapter expert has
    no folder of its own; `mergekit-mode check` merges it in memory to compare.)"""
    loaded = plan.recipe
    return {name: loaded.resolve(spec.model) for spec, name in zip(loaded.recipe.experts, loaded.recipe.expert_names)
            if name in domains and spec.adapter is None and spec.model is not None}


def sweep(plans: dict[str, Plan], out: Path, data: dict[str, Path], *, ctx: int, max_tokens: int, batch_size: int,
          device: str, force: bool, quiet: bool, replace_foreign: bool = False, own_weight: bool = False,
          dtype: str = "float32") -> SweepResults:
    """Build every planned variant into OUT/<mode> and evaluate each on `data`, and each domain's
    own expert (the target) where a domain is named after one.

    The text is read first, with the base's tokenizer (which every variant carries), so a bad
    --data or --ctx fails before anything is built. An OUT this run made is removed again if the
    run fails before anything is in it."""
    check_ctx(ctx)
    dev = parse_device(device)
    first = next(iter(plans.values()))
    streams = tokenize_domains(first.inputs[BASE].path, data, max_tokens)
    made = not out.exists()
    out.mkdir(exist_ok=True)
    results: dict[str, dict[str, DomainResult]] = {}
    try:
        for mode, plan in plans.items():
            if not quiet:
                print(f"building {out / mode} ...", file=sys.stderr, flush=True)
            write_model(plan, out / mode, force=force, replace_foreign=replace_foreign, device=device, quiet=quiet,
                        dtype=dtype)
            results[mode] = evaluate_streams(out / mode, streams, ctx=ctx, batch_size=batch_size, device=dev,
                                             dtype=compute_dtype(dtype, dev), quiet=quiet, own_weight=own_weight)
    except BaseException:
        if made and not any(out.iterdir()):
            out.rmdir()
        raise
    experts = {d: evaluate_streams(folder, {d: streams[d]}, ctx=ctx, batch_size=batch_size, device=dev,
                                   dtype=compute_dtype(dtype, dev), quiet=quiet)[d]
               for d, folder in expert_folders(first, list(streams)).items()}
    return SweepResults(results, experts)


TARGET = 1.05  # what docs/quality.md calls within 5% of the expert


def format_sweep(results: SweepResults) -> str:
    """Perplexity, one row per domain and one column per variant (the best of each row marked *) and
    the domain's own expert; then each variant's ratio to that expert (! above 1.05), and with
    --own-weight the mean weight each domain's tokens give its expert."""
    modes = list(results.variants)
    domains = list(next(iter(results.variants.values())))
    width = max(len(d) for d in [*domains, "domain"])
    col = max(10, *(len(m) + 1 for m in modes))
    experts = results.experts
    lines = [f"{'domain':<{width}}" + "".join(f"{m:>{col}}" for m in modes) + (f"{'expert':>{col}}" if experts else "")]
    for d in domains:
        ppl = {m: results.variants[m][d].perplexity for m in modes}
        best = min(ppl.values())
        cells = [f"{ppl[m]:.3f}" + ("*" if ppl[m] == best else " ") for m in modes]
        if experts:
            cells.append(f"{experts[d].perplexity:.3f} " if d in experts else "- ")
        lines.append(f"{d:<{width}}" + "".join(f"{c:>{col}}" for c in cells))
    if experts:
        lines += ["", f"ratio to the domain's own expert (! above {TARGET})"]
        for d in [d for d in domains if d in experts]:
            ratios = [results.variants[m][d].perplexity / experts[d].perplexity for m in modes]
            lines.append(f"{d:<{width}}" + "".join(f"{f'{r:.3f}' + ('!' if r > TARGET else ' '):>{col}}"
                                                   for r in ratios))
    owned = [d for d in domains if any(results.variants[m][d].own_weight for m in modes)]
    if owned:
        lines += ["", "mean weight of the domain's own expert (over tokens and layers; 1.0 = the expert alone)"]
        for d in owned:
            cells = [f"{sum(w.mean) / len(w.mean):.3f} " if (w := results.variants[m][d].own_weight) else "- "
                     for m in modes]
            lines.append(f"{d:<{width}}" + "".join(f"{c:>{col}}" for c in cells))
    return "\n".join(lines)
