"""The `mergekit-mode` command: thin click commands over recipe -> plan -> build.

User mistakes arrive here as ModeError and leave as one line on stderr with exit code 2.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from mergekit_mode import __version__
from mergekit_mode.errors import CheckFailed, ModeError

MAIN_HELP = """Build a Mixture-of-Domain-Experts model in a standard MoE format.

\b
    mergekit-mode RECIPE.yml OUT/     build the model described by RECIPE into OUT/
    mergekit-mode validate RECIPE...  check recipes and their inputs (no weights read)
    mergekit-mode schema              print the recipe's JSON Schema
    mergekit-mode demo [OUT/]         train tiny experts here and build a MoE of them
    mergekit-mode export-gguf OUT/    convert to GGUF with llama.cpp's converter
    mergekit-mode eval MODEL --data NAME=FILE ...    perplexity and routing per domain
    mergekit-mode report MODEL --data NAME=FILE ... --plot routing.png
    mergekit-mode sweep RECIPE OUT/ --router gateless,trained --data NAME=FILE ...
    mergekit-mode check MODEL --data NAME=FILE ... --max-ratio 1.05   quality gate (exit 1)
    mergekit-mode edit MODEL NEW --drop NAME | --replace NAME=PATH | --add NAME=PATH

The base model gives attention, embeddings, norms and tokenizer; each expert (a fine-tune of
the base, or a peft LoRA adapter of it) brings its MLP; a router picks experts per token. The
output loads in transformers, llama.cpp and vLLM with no custom code. `mergekit-mode build --help` lists the build options.
"""


COMPUTE_DTYPES = ("float32", "bfloat16", "auto")  # what build.compute_dtype resolves; here so --help needs no torch
COMPUTE_DTYPE_HELP = ("Dtype of the layer-by-layer runs (hidden states, router training, eval). auto: bfloat16 "
                      "where it is fast (a CPU with AMX or AVX512-BF16, or a CUDA GPU), else float32.")


def _compute_dtype_option(command):
    return click.option("--compute-dtype", "compute_dtype", type=click.Choice(COMPUTE_DTYPES), default="float32",
                        show_default=True, help=COMPUTE_DTYPE_HELP)(command)


class _DefaultToBuild(click.Group):
    """`mergekit-mode recipe.yml out/` means `mergekit-mode build recipe.yml out/`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["build", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultToBuild, help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergekit-mode")
def cli() -> None:
    pass


class _PathArg(click.Path):
    """A path argument; a name longer than a filesystem allows is a usage error up front, not an
    OSError from deep inside a run."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)

    def convert(self, value, param, ctx):
        from mergekit_mode.safety import name_too_long

        path = super().convert(value, param, ctx)
        problem = name_too_long(Path(path))
        if problem:
            self.fail(problem, param, ctx)
        return path


PATH = _PathArg()

FORCE_HELP = ("Replace OUT if it exists and is not empty; only a folder that mergekit-mode wrote (it holds "
              "mergekit_mode_recipe.yml), so a mistyped path cannot delete your files.")
FORCE_FOREIGN_HELP = ("Replace OUT whatever it holds, also a folder mergekit-mode did not write: everything in it "
                      "is deleted. Implies --force.")


def _warn(plan) -> None:
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)


@cli.command()
@click.argument("recipe", type=PATH)
@click.argument("out", type=PATH)
@click.option("--dry-run", is_flag=True, help="Print the plan (every output tensor, shape, dtype, source) and stop.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option("--force-foreign", is_flag=True, help=FORCE_FOREIGN_HELP)
@click.option("--device", default="cpu", show_default=True, help="Where tensors are computed: cpu, cuda, cuda:N.")
@_compute_dtype_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--keep-failed", is_flag=True, help="When a recipe check fails, keep OUT for inspection (exit code "
              "still 1).")
def build(recipe: Path, out: Path, dry_run: bool, force: bool, force_foreign: bool, device: str, compute_dtype: str,
          quiet: bool, keep_failed: bool) -> None:
    """Build the model described by RECIPE into the folder OUT.

    OUT is built in a hidden folder beside it and renamed into place when complete: an interrupted
    or failed run leaves no OUT behind (and an existing OUT untouched). OUT may not be, contain or
    lie inside anything the recipe reads (models, adapters, data files, the recipe itself). The
    recipe's `checks:` run on the finished model first: a failed check prints its table, leaves
    no OUT and exits with 1.
    """
    from mergekit_mode.build import parse_device, plan_recipe

    parse_device(device)
    plan = plan_recipe(recipe)
    _warn(plan)
    if dry_run:
        click.echo(plan.describe())
        return
    _write(plan, out, quiet, force=force, replace_foreign=force_foreign, device=device, keep_failed=keep_failed,
           dtype=compute_dtype)


def _write(plan, out: Path, quiet: bool, **options) -> None:
    """Build or edit into `out`, printing the table of every check the build ran, passed or failed."""
    from mergekit_mode.build import write_model

    reports = ()
    try:
        reports = write_model(plan, out, quiet=quiet, **options)
    except CheckFailed as e:
        reports = e.reports
        raise
    finally:
        for report in reports:
            click.echo(report.table())
    if not quiet:
        click.echo(f"wrote {out} ({len(plan.tensors)} tensors)", err=True)


@cli.command()
@click.argument("recipes", nargs=-1, required=True, type=PATH)
def validate(recipes: tuple[Path, ...]) -> None:
    """Check RECIPES and their inputs without reading weights (LoRA biases aside: a few vectors).

    Checks the schema, that every folder, config.json and safetensors header exists and parses,
    that every expert has the base's architecture and shapes, that every adapter is a mergeable
    LoRA whose modules and ranks fit, and that top-k fits. Prints one line per recipe; exit
    code 2 if any is invalid (for CI pipelines).
    """
    from mergekit_mode.build import plan_recipe

    failed = 0
    for path in recipes:
        try:
            plan = plan_recipe(path)
        except ModeError as e:
            click.echo(f"error: {e}", err=True)
            failed += 1
            continue
        _warn(plan)
        click.echo(f"ok: {path} ({plan.format.architecture}, {plan.num_experts} experts, top-{plan.top_k}, "
                   f"{len(plan.tensors)} tensors, {plan.total_bytes / 1e9:.2f} GB)")
    if failed:
        sys.exit(2)


@cli.command()
def schema() -> None:
    """Print the recipe's JSON Schema (for editors and CI)."""
    from mergekit_mode.recipe import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


def _data_options(command):
    """The options eval, report and sweep share (what text, how it is cut, where the model runs)."""
    options = [
        click.option("--data", "data", multiple=True, required=True, metavar="NAME=FILE",
                     help="A domain's text: plain text (one document per line) or .jsonl with 'text'. Repeatable."),
        click.option("--ctx", default=128, show_default=True, help="Window length in tokens (non-overlapping windows)."),
        click.option("--max-tokens", default=50_000, show_default=True, type=click.IntRange(min=1),
                     help="Tokens read from the start of each file."),
        click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
                     help="Windows per forward pass."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _eval_options(command):
    """eval's and report's options (check scores the model and its references in float32, so that their
    ratio compares like with like: no --compute-dtype)."""
    command = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")(_compute_dtype_option(command))
    return click.argument("model", type=PATH)(_data_options(command))


def _run_eval(model: Path, data: tuple[str, ...], ctx: int, max_tokens: int, batch_size: int, device: str,
              compute_dtype: str, quiet: bool, own_weight: bool = False, oracle: str | None = None):
    from mergekit_mode.build import compute_dtype as resolve, parse_device
    from mergekit_mode.evaluate import evaluate, parse_data

    dev = parse_device(device)
    return evaluate(model, parse_data(data), ctx=ctx, batch_size=batch_size, max_tokens=max_tokens,
                    device=dev, dtype=resolve(compute_dtype, dev), quiet=quiet, own_weight=own_weight, oracle=oracle)


def _names(model: Path, results) -> list[str]:
    """Expert labels for tables and plots: the recipe's names when MODEL was built by us."""
    from mergekit_mode.evaluate import expert_names

    routed = [r.routing for r in results.values() if r.routing is not None]
    return expert_names(model, len(routed[0][0])) if routed else []


@cli.command("eval")
@_eval_options
@click.option("--own-weight", is_flag=True,
              help="MoE: for each domain named like an expert, the weight its tokens give that expert, per layer.")
@click.option("--oracle-routing", type=click.Choice(["top1", "topk"]), default=None,
              help="MoE: route every token of a domain by its name: top1 = that expert alone (the dense oracle), "
                   "topk = that expert plus the router's best others, with the router's weights.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"domains": {NAME: {perplexity, tokens, routing, own_weight}}}.')
def eval_command(model: Path, data: tuple[str, ...], ctx: int, max_tokens: int, batch_size: int, device: str,
                 compute_dtype: str, quiet: bool, own_weight: bool, oracle_routing: str | None, as_json: bool) -> None:
    """Perplexity per domain of MODEL (any causal LM folder) and, for MoE models, the share of
    tokens each expert receives per layer.

    Perplexity is token-weighted over non-overlapping windows of --ctx tokens of each domain's
    text (the first token of each window is context only). Routing is the share of the tokens
    that have each expert among their top-k; each layer's shares sum to k.

    When a --data NAME is an expert's name (the names of the recipe MODEL was built from), the
    domain has a right answer: --own-weight reports the weight its tokens give that expert (mean,
    share not choosing it, spread), and --oracle-routing measures the MoE with routing forced to
    it. Perplexity with the router, with topk and with top1 oracle routing splits the loss to the
    expert into misrouting (router -> topk) and soft mixing (topk -> top1).
    """
    from mergekit_mode.evaluate import format_table, to_json

    results = _run_eval(model, data, ctx, max_tokens, batch_size, device, compute_dtype, quiet, own_weight,
                        oracle_routing)
    click.echo(json.dumps(to_json(results)) if as_json else format_table(results, _names(model, results)))


@cli.command()
@click.argument("model", type=PATH)
@_data_options
@click.option("--against", type=click.Choice(["experts", "base"]), default="experts", show_default=True,
              help="experts: each domain against the expert of the same name; base: against the base model.")
@click.option("--max-ratio", type=click.FloatRange(min=0, min_open=True), required=True, metavar="R",
              help="A domain fails when its perplexity is above R times its reference's.")
@click.option("--json", "as_json", is_flag=True, help='Print {"against", "max_ratio", "passed", "domains": {NAME: '
              '{perplexity, reference, reference_perplexity, ratio, passed, tokens}}}.')
@click.option("--recipe-dir", type=PATH, default=None,
              help="Where the relative paths of MODEL's recipe resolve (default: the recipe's folder at build time).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def check(model: Path, data: tuple[str, ...], ctx: int, max_tokens: int, batch_size: int, device: str, against: str,
          max_ratio: float, as_json: bool, recipe_dir: Path | None, quiet: bool) -> None:
    """Quality gate for CI: exit code 1 when a domain's perplexity on MODEL (a folder mergekit-mode
    built) is above R times its reference's.

    Against `experts`, each --data NAME is matched to MODEL's expert NAME (an adapter expert is
    merged in memory with peft, nothing written); against `base`, every domain to the base model.
    The inputs are found through MODEL's recipe. Prints a table with the failing rows marked FAIL;
    exit code 2 for mistakes (a bad option, a domain with no expert, a missing file).
    """
    from mergekit_mode.build import parse_device
    from mergekit_mode.check import run_check
    from mergekit_mode.evaluate import parse_data
    from pydantic import ValidationError

    from mergekit_mode.provenance import built_recipe
    from mergekit_mode.recipe import CheckSpec

    files = {name: path.absolute() for name, path in parse_data(data).items()}
    try:
        spec = CheckSpec(against=against, max_ratio=max_ratio, data=files, ctx=ctx, max_tokens=max_tokens,
                         batch_size=batch_size)
    except ValidationError as e:
        first = e.errors()[0]
        raise ModeError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    report = run_check(model, built_recipe(model, recipe_dir), spec, device=parse_device(device), quiet=quiet)
    click.echo(json.dumps(report.to_json()) if as_json else report.table())
    if not report.passed:
        raise CheckFailed(report.summary())


@cli.command()
@_eval_options
@click.option("--plot", type=PATH, help="Write a routing heatmap per domain (PNG/PDF/SVG).")
def report(model: Path, data: tuple[str, ...], ctx: int, max_tokens: int, batch_size: int, device: str,
           compute_dtype: str, quiet: bool, plot: Path | None) -> None:
    """The eval table of MODEL and, with --plot, a heatmap per domain of the expert shares per
    layer (needs matplotlib: pip install 'mergekit-mode[report]')."""
    from mergekit_mode.evaluate import format_table
    from mergekit_mode.report import plot_routing, pyplot

    if plot is not None:
        pyplot()
    results = _run_eval(model, data, ctx, max_tokens, batch_size, device, compute_dtype, quiet)
    names = _names(model, results)
    click.echo(format_table(results, names))
    if plot is not None:
        plot_routing(results, names, plot)
        click.echo(f"wrote {plot}", err=True)


@cli.command()
@click.argument("out", type=PATH, default=Path("demo-out"))
@click.option("--pretrain-steps", default=150, show_default=True, help="Training steps of the tiny base.")
@click.option("--finetune-steps", default=150, show_default=True, help="Training steps of each expert.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty; only a folder an earlier "
              "demo made, so a mistyped path cannot delete your files.")
@click.option("--force-foreign", is_flag=True, help=FORCE_FOREIGN_HELP)
@click.option("--arch", type=click.Choice(["llama", "qwen2", "qwen3"]), default="llama", show_default=True,
              help="The base's family; the MoE is in that family's default output format (README: Output formats).")
def demo(out: Path, pretrain_steps: int, finetune_steps: int, force: bool, force_foreign: bool, arch: str) -> None:
    """Train tiny domain experts on this machine and build a MoE of them into OUT.

    Needs no download: it makes four synthetic text domains, a tokenizer, a tiny base and one
    expert per domain (about a minute on 2 CPU cores), writes OUT/recipe-*.yml, builds OUT/moe-*
    with them, and prints each model's perplexity on every domain.
    """
    from mergekit_mode.demo import demo as run_demo

    run_demo(out, pretrain_steps=pretrain_steps, finetune_steps=finetune_steps, force=force,
             replace_foreign=force_foreign, arch=arch)


@cli.command("export-gguf")
@click.argument("model", type=PATH)
@click.option("--outtype", type=click.Choice(["f16", "bf16", "q8_0", "f32"]), default="f16", show_default=True,
              help="Tensor type of the GGUF file.")
@click.option("--outfile", type=PATH, default=None,
              help="GGUF file to write (default: MODEL-OUTTYPE.gguf beside MODEL); not inside MODEL.")
@click.option("--force", is_flag=True, help="Replace OUTFILE (and its Modelfile) if it exists.")
@click.option("--ollama", is_flag=True, help="Also write an Ollama Modelfile beside it (OUTFILE's name with "
              ".Modelfile): the chat template as Ollama's Go template, stop tokens, generation parameters.")
def export_gguf(model: Path, outtype: str, outfile: Path | None, force: bool, ollama: bool) -> None:
    """Convert the model folder MODEL to a GGUF file with llama.cpp's own converter.

    The converter (llama.cpp's convert_hf_to_gguf.py) is not part of mergekit-mode: set
    LLAMA_CPP_CONVERTER to its path, or run `.ci/setup-runtimes llama.cpp` in a mergekit-mode
    checkout, which takes it from the llama-cpp-python sdist on PyPI (see the README).

    The converter imports a folder's code for some architectures, so MODEL must be what
    mergekit-mode writes (its architectures, safetensors only, no auto_map, no .py files).
    """
    from mergekit_mode import gguf

    model = model.resolve() if model.exists() else model
    outfile = outfile or model.with_name(f"{model.name}-{outtype}.gguf")
    if outfile.exists() and not outfile.is_dir() and not force:
        raise ModeError(f"--outfile: {outfile} exists (use --force to replace it)")
    modelfile = outfile.with_suffix(".Modelfile")
    if ollama:
        from mergekit_mode.ollama import make_modelfile, write_modelfile

        if modelfile.exists() and not force:
            raise ModeError(f"--ollama: {modelfile} exists (use --force to replace it)")
        text, template_note = make_modelfile(model, outfile, modelfile)  # before converting: fails early
    note = gguf.outtype_note(outtype, gguf.cpu_flags())
    if note:
        click.echo(f"note: {note}", err=True)
    try:
        gguf.export_gguf(model, outfile, outtype)
    except gguf.ConverterNotFoundError as e:
        raise ModeError(str(e).splitlines()[0].split(". ")[0].rstrip(".") + ": set LLAMA_CPP_CONVERTER or run "
                        "`.ci/setup-runtimes llama.cpp` (README, 'GGUF')") from None
    except FileNotFoundError as e:
        raise ModeError(f"MODEL: {e}") from None
    except gguf.GGUFExportError as e:
        raise ModeError(" | ".join(str(e).splitlines()[-3:])) from None
    click.echo(f"wrote {outfile}")
    if ollama:
        write_modelfile(modelfile, text)
        if template_note:
            click.echo(f"warning: {template_note}", err=True)
        click.echo(f"wrote {modelfile} (ollama create NAME -f {modelfile})")


@cli.command()
@click.argument("recipe", type=PATH)
@click.argument("out", type=PATH)
@click.option("--router", "routers", default="gateless,noisy,hidden,trained", show_default=True,
              help="Comma-separated router modes; each is built into OUT/<mode>.")
@_data_options
@click.option("--own-weight", is_flag=True,
              help="Also print the mean weight each domain's tokens give the expert of the same name.")
@_compute_dtype_option
@click.option("--force", is_flag=True, help="Replace OUT/<mode> folders that exist and are not empty; only "
              "folders mergekit-mode wrote.")
@click.option("--force-foreign", is_flag=True, help="Replace OUT/<mode> folders whatever they hold. Implies --force.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def sweep(recipe: Path, out: Path, routers: str, data: tuple[str, ...], ctx: int, max_tokens: int, batch_size: int,
          device: str, own_weight: bool, compute_dtype: str, force: bool, force_foreign: bool, quiet: bool) -> None:
    """Build RECIPE once per router mode into OUT/<mode>/ and print their perplexity side by side.

    The recipe's router block is replaced by each mode, keeping its settings where they apply (top-k,
    seed, std, pooling, data limits, train). Every variant is planned before any is built; the --data
    text is tokenized once. Table: one row per domain, one column per mode, the best marked *.

    Name each --data after the expert of its domain (NAME = the expert's name in the recipe) to
    compare with the target: that expert is scored too, and a second table gives each mode's
    ratio to it (! above 1.05, the margin docs/quality.md measures the defaults against).
    """
    from mergekit_mode.build import parse_device
    from mergekit_mode.evaluate import parse_data
    from mergekit_mode.sweep import format_sweep, parse_modes, plan_variants, sweep as run_sweep

    parse_device(device)
    domains = parse_data(data)
    plans = plan_variants(recipe, parse_modes(routers), out, force, domains, replace_foreign=force_foreign)
    for mode, plan in plans.items():
        for warning in plan.warnings:
            click.echo(f"warning: {mode}: {warning}", err=True)
    results = run_sweep(plans, out, domains, ctx=ctx, max_tokens=max_tokens, batch_size=batch_size, device=device,
                        dtype=compute_dtype, force=force, replace_foreign=force_foreign, quiet=quiet,
                        own_weight=own_weight)
    click.echo(format_sweep(results))


def _named_path(value: str | None, option: str) -> tuple[str, Path] | None:
    if value is None:
        return None
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ModeError(f"{option}: {value!r} is not NAME=PATH")
    return name, Path(path)


@cli.command()
@click.argument("model", type=PATH)
@click.argument("new", type=PATH)
@click.option("--drop", metavar="NAME", help="Remove expert NAME.")
@click.option("--replace", "replace_", metavar="NAME=PATH", help="Expert NAME becomes the model or adapter folder PATH.")
@click.option("--add", metavar="NAME=PATH", help="Add the model or adapter folder PATH as expert NAME (last).")
@click.option("--data", type=PATH, help="The new expert's text (router data for hidden and "
              "trained routers), with --add or --replace.")
@click.option("--recipe-dir", type=PATH, default=None,
              help="Where the relative paths of MODEL's recipe resolve (default: the recipe's folder at build time).")
@click.option("--dry-run", is_flag=True, help="Print the plan (copied tensors read `previous build:`) and stop.")
@click.option("--force", is_flag=True, help=FORCE_HELP.replace("OUT", "NEW"))
@click.option("--force-foreign", is_flag=True, help=FORCE_FOREIGN_HELP.replace("OUT", "NEW"))
@click.option("--device", default="cpu", show_default=True, help="Where tensors are computed: cpu, cuda, cuda:N.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--keep-failed", is_flag=True, help="When a recipe check fails, keep NEW for inspection.")
def edit(model: Path, new: Path, drop: str | None, replace_: str | None, add: str | None, data: Path | None,
         recipe_dir: Path | None, dry_run: bool, force: bool, force_foreign: bool, device: str, quiet: bool,
         keep_failed: bool) -> None:
    """Drop, replace or add one expert of MODEL (a folder mergekit-mode built) into NEW.

    NEW is what a build of the edited recipe gives (it carries that recipe and its card): tensors
    whose inputs did not change are copied from MODEL byte for byte, only the rest is computed.
    Routers follow their mode: gateless, noisy and random by definition; hidden computes only new
    rows; trained retrains from MODEL's rows (see docs/edit.md). Written as a build writes.
    """
    from mergekit_mode.edit import plan_edit

    plan, how, surgery = plan_edit(model, drop=drop, replace_=_named_path(replace_, "--replace"),
                                   add=_named_path(add, "--add"), data=data, recipe_dir=recipe_dir)
    _warn(plan)
    for note in surgery.notes:
        click.echo(f"warning: {note}", err=True)
    if dry_run:
        click.echo(how.execution.describe())
        click.echo(surgery.summary())
        return
    if not quiet:
        click.echo(surgery.summary(), err=True)
    _write(plan, new, quiet, force=force, replace_foreign=force_foreign, device=device, keep_failed=keep_failed,
           edit=how)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# Signals that end a run: each cleans up like Ctrl-C (no staging folder, no partial .gguf left).
INTERRUPTS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def main(args: list[str] | None = None) -> None:
    """Entry point: exit code 0 on success, 2 on a user error (one line, no traceback)."""
    for signum in INTERRUPTS:  # a plain `kill`, a closed terminal, ...
        signal.signal(signum, _interrupt)
    try:
        cli.main(args=args, prog_name="mergekit-mode", standalone_mode=False)
    except CheckFailed as e:
        click.echo(f"check failed: {e}", err=True)
        sys.exit(1)
    except ModeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.BadParameter as e:  # a bad value (a range, a name too long): one line, as every user mistake
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
