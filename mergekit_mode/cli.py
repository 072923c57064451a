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
from mergekit_mode.errors import ModeError

MAIN_HELP = """Build a Mixture-of-Domain-Experts model in the canonical Mixtral format.

\b
    mergekit-mode RECIPE.yml OUT/     build the model described by RECIPE into OUT/
    mergekit-mode validate RECIPE...  check recipes and their inputs (no weights read)
    mergekit-mode schema              print the recipe's JSON Schema
    mergekit-mode demo [OUT/]         train tiny experts here and build a MoE of them
    mergekit-mode export-gguf OUT/    convert to GGUF with llama.cpp's converter
    mergekit-mode eval MODEL --data NAME=FILE ...    perplexity and routing per domain
    mergekit-mode report MODEL --data NAME=FILE ... --plot routing.png
    mergekit-mode sweep RECIPE OUT/ --router gateless,trained --data NAME=FILE ...

The base model gives attention, embeddings, norms and tokenizer; each expert (a fine-tune of
the base, or a peft LoRA adapter of it) brings its MLP; a router picks experts per token. The
output loads in transformers, llama.cpp and vLLM with no custom code. `mergekit-mode build --help` lists the build options.
"""


COMPUTE_DTYPES = ("float32", "bfloat16", "auto")  # build.COMPUTE_DTYPES, without importing torch for --help
COMPUTE_DTYPE_HELP = ("Dtype of the layer-by-layer runs (hidden states, router training, eval). auto: bfloat16 "
                      "where it is fast (a CPU with AMX or AVX512-BF16, or a CUDA GPU), else float32.")


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


def _warn(plan) -> None:
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print the plan (every output tensor, shape, dtype, source) and stop.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--device", default="cpu", show_default=True, help="Where tensors are computed: cpu, cuda, cuda:N.")
@click.option("--compute-dtype", "compute_dtype", type=click.Choice(COMPUTE_DTYPES), default="float32",
              show_default=True, help=COMPUTE_DTYPE_HELP)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def build(recipe: Path, out: Path, dry_run: bool, force: bool, device: str, compute_dtype: str, quiet: bool) -> None:
    """Build the model described by RECIPE into the folder OUT.

    OUT is built in a hidden folder beside it and renamed into place when complete: an interrupted
    or failed run leaves no OUT behind (and an existing OUT untouched).
    """
    from mergekit_mode.build import plan_recipe, write_model

    plan = plan_recipe(recipe)
    _warn(plan)
    if dry_run:
        click.echo(plan.describe())
        return
    write_model(plan, out, force=force, device=device, quiet=quiet, dtype=compute_dtype)
    if not quiet:
        click.echo(f"wrote {out} ({len(plan.tensors)} tensors)", err=True)


@cli.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path))
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
        cfg = plan.config
        click.echo(f"ok: {path} ({cfg['num_local_experts']} experts, top-{cfg['num_experts_per_tok']}, "
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
        click.option("--max-tokens", default=50_000, show_default=True, help="Tokens read from the start of each file."),
        click.option("--batch-size", default=8, show_default=True, help="Windows per forward pass."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N."),
        click.option("--compute-dtype", "compute_dtype", type=click.Choice(COMPUTE_DTYPES), default="float32",
                     show_default=True, help=COMPUTE_DTYPE_HELP),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _eval_options(command):
    command = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")(command)
    return click.argument("model", type=click.Path(path_type=Path))(_data_options(command))


def _run_eval(model: Path, data: tuple[str, ...], ctx: int, max_tokens: int, batch_size: int, device: str,
              compute_dtype: str, quiet: bool):
    from mergekit_mode.build import compute_dtype as resolve, parse_device
    from mergekit_mode.evaluate import evaluate, parse_data

    dev = parse_device(device)
    return evaluate(model, parse_data(data), ctx=ctx, batch_size=batch_size, max_tokens=max_tokens,
                    device=dev, dtype=resolve(compute_dtype, dev), quiet=quiet)


def _names(model: Path, results) -> list[str]:
    """Expert labels for tables and plots: the recipe's names when MODEL was built by us."""
    from mergekit_mode.evaluate import expert_names

    routed = [r.routing for r in results.values() if r.routing is not None]
    return expert_names(model, len(routed[0][0])) if routed else []


@cli.command("eval")
@_eval_options
@click.option("--json", "as_json", is_flag=True, help='Print {"domains": {NAME: {perplexity, tokens, routing}}}.')
def eval_command(model: Path, data: tuple[str, ...], ctx: int, max_tokens: int, batch_size: int, device: str,
                 compute_dtype: str, quiet: bool, as_json: bool) -> None:
    """Perplexity per domain of MODEL (any causal LM folder) and, for MoE models, the share of
    tokens each expert receives per layer.

    Perplexity is token-weighted over non-overlapping windows of --ctx tokens of each domain's
    text (the first token of each window is context only). Routing is the share of the tokens
    that have each expert among their top-k; each layer's shares sum to k.
    """
    from mergekit_mode.evaluate import format_table, to_json

    results = _run_eval(model, data, ctx, max_tokens, batch_size, device, compute_dtype, quiet)
    click.echo(json.dumps(to_json(results)) if as_json else format_table(results, _names(model, results)))


@cli.command()
@_eval_options
@click.option("--plot", type=click.Path(path_type=Path), help="Write a routing heatmap per domain (PNG/PDF/SVG).")
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
@click.argument("out", type=click.Path(path_type=Path), default=Path("demo-out"))
@click.option("--pretrain-steps", default=150, show_default=True, help="Training steps of the tiny base.")
@click.option("--finetune-steps", default=150, show_default=True, help="Training steps of each expert.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
def demo(out: Path, pretrain_steps: int, finetune_steps: int, force: bool) -> None:
    """Train tiny domain experts on this machine and build a MoE of them into OUT.

    Needs no download: it makes four synthetic text domains, a tokenizer, a tiny Llama base and
    one expert per domain (about a minute on 2 CPU cores), writes OUT/recipe.yml, builds
    OUT/moe with it, and prints each model's perplexity on every domain.
    """
    from mergekit_mode.demo import demo as run_demo

    run_demo(out, pretrain_steps=pretrain_steps, finetune_steps=finetune_steps, force=force)


@cli.command("export-gguf")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--outtype", type=click.Choice(["f16", "bf16", "q8_0", "f32"]), default="f16", show_default=True,
              help="Tensor type of the GGUF file.")
@click.option("--outfile", type=click.Path(path_type=Path), default=None,
              help="GGUF file to write (default: MODEL-OUTTYPE.gguf beside MODEL).")
@click.option("--force", is_flag=True, help="Replace OUTFILE if it exists.")
def export_gguf(model: Path, outtype: str, outfile: Path | None, force: bool) -> None:
    """Convert the model folder MODEL to a GGUF file with llama.cpp's own converter.

    The converter (llama.cpp's convert_hf_to_gguf.py) is not part of mergekit-mode: set
    LLAMA_CPP_CONVERTER to its path, or run `.ci/setup-runtimes llama.cpp` in a mergekit-mode
    checkout, which takes it from the llama-cpp-python sdist on PyPI (see the README).
    """
    from mergekit_mode import gguf

    model = model.resolve() if model.exists() else model
    outfile = outfile or model.with_name(f"{model.name}-{outtype}.gguf")
    if outfile.exists() and not force:
        raise ModeError(f"--outfile: {outfile} exists (use --force to replace it)")
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


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--router", "routers", default="gateless,noisy,hidden,trained", show_default=True,
              help="Comma-separated router modes; each is built into OUT/<mode>.")
@_data_options
@click.option("--force", is_flag=True, help="Replace OUT/<mode> folders that exist and are not empty.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def sweep(recipe: Path, out: Path, routers: str, data: tuple[str, ...], ctx: int, max_tokens: int, batch_size: int,
          device: str, compute_dtype: str, force: bool, quiet: bool) -> None:
    """Build RECIPE once per router mode into OUT/<mode>/ and print their perplexity side by side.

    The recipe's router block is replaced by each mode, keeping its settings where they apply (top-k,
    seed, std, pooling, data limits, train). Every variant is planned before any is built; the --data
    text is tokenized once. Table: one row per domain, one column per mode, the best marked *.
    """
    from mergekit_mode.evaluate import parse_data
    from mergekit_mode.sweep import format_sweep, parse_modes, plan_variants, sweep as run_sweep

    domains = parse_data(data)
    plans = plan_variants(recipe, parse_modes(routers), out, force)
    for mode, plan in plans.items():
        for warning in plan.warnings:
            click.echo(f"warning: {mode}: {warning}", err=True)
    results = run_sweep(plans, out, domains, ctx=ctx, max_tokens=max_tokens, batch_size=batch_size, device=device,
                        dtype=compute_dtype, force=force, quiet=quiet)
    click.echo(format_sweep(results))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(args: list[str] | None = None) -> None:
    """Entry point: exit code 0 on success, 2 on a user error (one line, no traceback)."""
    # A plain `kill` (SIGTERM) cleans up like Ctrl-C: no staging folder is left behind.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        cli.main(args=args, prog_name="mergekit-mode", standalone_mode=False)
    except ModeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
