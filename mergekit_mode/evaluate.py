"""Per-domain perplexity and expert routing of any causal LM folder (`mergekit-mode eval`).

Perplexity is token-weighted: each domain's documents (read as for router data: plain text one
document per line, or .jsonl `text`, tokenized with BOS, first `max_tokens` tokens) are joined
into one token stream and cut into non-overlapping windows of `ctx` tokens; every token after the
first of its window is scored, and perplexity is exp(total loss / scored tokens). Fixed windows
make numbers comparable between models that share a tokenizer (the base, the experts, the MoE).

For Mixture-of-Experts models in an output format mergekit-mode writes (mergekit_mode.formats, found
from the config's model_type) routing is, per layer and expert,
the share of the input tokens that have the expert among their top-k choices (from the router
logits): 1.0 means the expert runs on every token. Each layer sums to k; k/E per expert is what
a balanced router gives. Where a domain's name is an expert's name, eval can also report the weight
each token gives that expert (`own_weight`) and run the MoE with routing forced from the domain
(`oracle`): see domain_routing.py.

Models of the base families and output formats mergekit-mode knows (mergekit_mode.formats) are
run one decoder layer at a time (streamed.py) over groups of windows: memory is one layer plus the
activations of a group, and the LM head scores a few hundred tokens at a time instead of holding
[tokens, vocab] logits. Other causal LMs, and the domain analyses (own weight, oracle routing, which
hook transformers' MoE blocks), load the model whole with transformers.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mergekit_mode.build import RECIPE_FILE
from mergekit_mode.calibration import iter_documents, load_tokenizer, tokenize_documents
from mergekit_mode import formats
from mergekit_mode.domain_routing import BINS, OracleRouting, OwnWeight, OwnWeightCounter, oracle_routing, recorded_choices
from mergekit_mode.errors import ModeError
from mergekit_mode.formats import families
from mergekit_mode.inputs import ModelFolder, TensorReader, read_json
from mergekit_mode.layerwise import Batch, FolderWeights, LayerStream, make_batches
from mergekit_mode.safety import check_name_lengths, read_small_file
from mergekit_mode.streamed import MoeShape, StreamedLM, topk_counts

# model_type values run layer by layer (the base families and the output formats); anything else
# goes through transformers whole.
STREAMED_TYPES = tuple(t for f in families.FAMILIES for t in f.model_types) + formats.NAMES
# Tokens whose activations one layer-major pass holds (hidden_size x 4 bytes each).
GROUP_TOKENS = 16_384


@dataclass(frozen=True)
class DomainResult:
    perplexity: float
    tokens: int  # scored tokens
    routing: Optional[list[list[float]]]  # [layer][expert] share of tokens; None for dense models
    own_weight: Optional[OwnWeight] = None  # when asked for and the domain names an expert


def parse_data(values: tuple[str, ...]) -> dict[str, Path]:
    """`NAME=FILE` options -> {NAME: FILE}, in the given order."""
    data: dict[str, Path] = {}
    for value in values:
        name, sep, file = value.partition("=")
        if not sep or not name or not file:
            raise ModeError(f"--data: {value!r} is not NAME=FILE")
        if name in data:
            raise ModeError(f"--data: domain {name!r} given twice")
        check_name_lengths(Path(file), f"--data {name}")
        data[name] = Path(file)
    return data


def windows(ids: list[int], ctx: int) -> list[list[int]]:
    """Non-overlapping windows of `ctx` tokens; a last window shorter than 2 tokens scores nothing."""
    return [ids[i:i + ctx] for i in range(0, len(ids), ctx) if len(ids[i:i + ctx]) >= 2]


def load_model(path: Path, device: torch.device, field: str = "MODEL"):
    """A model folder (`field`: who asked for it) with transformers, once it is known to be a local folder
    of safetensors that asks for no custom code (and told never to run any, nor to look for it on the
    model hub)."""
    from transformers import AutoModelForCausalLM

    ModelFolder.open_to_load(path, field)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False,
                                                     local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ModeError(f"{field}: cannot load {path} ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()


def expert_names(path: Path, num_experts: int) -> list[str]:
    """The experts' names from the recipe that build copied into the model folder, else 0..E-1."""
    from mergekit_mode.recipe import load_yaml, parse_recipe

    try:
        text = read_small_file(path / RECIPE_FILE).decode("utf-8")
        names = parse_recipe(load_yaml(text, RECIPE_FILE), RECIPE_FILE).expert_names
    except (OSError, UnicodeDecodeError, ModeError):
        names = []
    return names if len(names) == num_experts else [str(e) for e in range(num_experts)]


def _result(loss_sum: float, scored: int, counts: Optional[torch.Tensor], routed_tokens: int) -> DomainResult:
    if scored == 0:
        raise ModeError("--data: fewer than 2 tokens of text")
    routing = (counts / routed_tokens).tolist() if counts is not None else None
    return DomainResult(float(torch.tensor(loss_sum / scored).exp()), scored, routing)


@torch.no_grad()
def evaluate_domain(model, ids: list[int], ctx: int, batch_size: int, device: torch.device,
                    expert: Optional[tuple[int, str]] = None, oracle: Optional[OracleRouting] = None,
                    progress: Callable[[int], None] = lambda _: None) -> DomainResult:
    """One domain through a whole transformers model. `expert` (index, name) is the domain's own
    expert: its weight is reported, and with `oracle` the routing is forced to it."""
    cfg = model.config
    fmt = formats.of_config(cfg)
    counts = torch.zeros(cfg.num_hidden_layers, fmt.num_experts(cfg)) if fmt else None
    own = OwnWeightCounter(cfg.num_hidden_layers, expert[0]) if expert and fmt else None
    loss_sum, scored, routed_tokens = 0.0, 0, 0
    with _forced(model, expert, oracle), recorded_choices(model) as choices:
        for batch in make_batches(windows(ids, ctx), batch_size):
            choices.clear()
            logits = model(input_ids=batch.ids.to(device)).logits
            targets = batch.targets()[:, :-1].to(device)
            loss_sum += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                        ignore_index=-100, reduction="sum").item()
            scored += int((targets != -100).sum())
            if counts is not None:
                routed_tokens += batch.tokens
                _count_choices(counts, own, choices, batch)
            progress(batch.tokens)
    result = _result(loss_sum, scored, counts, routed_tokens)
    return replace(result, own_weight=own.result(expert[1])) if own else result


def _forced(model, expert: Optional[tuple[int, str]], oracle: Optional[OracleRouting]):
    return oracle_routing(model, expert[0], oracle) if oracle and expert else nullcontext()


def _evaluate_streamed(folder: ModelFolder, streams: dict[str, list[int]], ctx: int, batch_size: int,
                       device: torch.device, dtype: torch.dtype, bar: tqdm) -> dict[str, DomainResult]:
    cfg = folder.config
    with TensorReader() as reader:
        weights = FolderWeights(folder, reader)
        stream = LayerStream(folder, weights, [], device, dtype)
        fmt = stream.moe_format
        moe = routers = shared = None
        if fmt is not None:
            moe = MoeShape(fmt.num_experts(cfg), fmt.top_k(cfg))

            def read(name: str) -> torch.Tensor:
                return weights(name).to(device, torch.float32)

            routers = [read(fmt.router_tensor(i)) for i in range(stream.num_layers)]
            if fmt.shared_expert_gate is not None:
                shared = [read(fmt.shared_gate_tensor(i)) for i in range(stream.num_layers)]
        lm = StreamedLM(stream, moe, routers, shared)
        results = {}
        for name, ids in streams.items():
            bar.set_description(f"eval {name}")
            counts = torch.zeros(stream.num_layers, moe.num_experts) if moe else None
            loss_sum, scored, routed = 0.0, 0, 0
            for group in _groups(make_batches(windows(ids, ctx), batch_size)):
                tokens = sum(b.tokens for b in group)

                def count(layer: int, _batch: int, logits: torch.Tensor) -> None:
                    counts[layer] += topk_counts(logits, moe.top_k).cpu()

                start = bar.n  # whole tokens: float increments summed past the total, and tqdm warned

                def advance(done: float) -> None:
                    bar.update(start + round(done * tokens) - bar.n)

                part, n = lm.forward(group, progress=advance, router_logits=count)
                loss_sum, scored, routed = loss_sum + part, scored + n, routed + tokens
            results[name] = _result(loss_sum, scored, counts, routed)
    return results


def _count_choices(counts: torch.Tensor, own: Optional[OwnWeightCounter], choices, batch: Batch) -> None:
    """Top-k membership per layer and expert (and the own expert's weight) from each router's choices."""
    for layer, (weights, indices) in enumerate(choices):
        weights = batch.real(weights.reshape(*batch.ids.shape, -1))
        indices = batch.real(indices.reshape(*batch.ids.shape, -1))
        counts[layer] += torch.bincount(indices.flatten(), minlength=counts.shape[1])
        if own is not None:
            own.add(layer, weights, indices)


def _groups(batches: list[Batch]) -> list[list[Batch]]:
    """Consecutive batches of at most GROUP_TOKENS tokens in all (at least one batch each)."""
    groups: list[list[Batch]] = [[]]
    for b in batches:
        if groups[-1] and sum(x.ids.numel() for x in groups[-1]) + b.ids.numel() > GROUP_TOKENS:
            groups.append([])
        groups[-1].append(b)
    return [g for g in groups if g]


def tokenize_domains(model_dir: Path, data: dict[str, Path], max_tokens: int = 50_000) -> dict[str, list[int]]:
    """Each domain's token stream, with MODEL's tokenizer. Models that share a tokenizer (a base, its
    experts, every MoE built from them) share the streams, so a sweep tokenizes once."""
    tokenizer = load_tokenizer(model_dir, "MODEL")
    streams = {}
    for name, path in data.items():
        pieces = tokenize_documents(iter_documents(path, f"--data {name}"), tokenizer, max_tokens, max_tokens)
        streams[name] = [t for piece in pieces for t in piece]
    return streams


def check_ctx(ctx: int) -> None:
    if ctx < 2:
        raise ModeError(f"--ctx: {ctx} is too short (at least 2 tokens)")


def own_experts(model_dir: Path, domains: list[str], oracle: Optional[OracleRouting]) -> dict[str, tuple[int, str]]:
    """Each domain whose name is an expert's name in MODEL (from the recipe build copied in), with
    that expert's index. With `oracle` every domain must have one (checked before any weights load)."""
    try:
        config = json.loads(read_small_file(model_dir / "config.json"))
        fmt = formats.of_config(config)
        num_experts = fmt.num_experts(config) if fmt else None
    except (OSError, ValueError, KeyError, TypeError, ModeError):
        num_experts = None  # load_model says what is wrong with the folder
    names = expert_names(model_dir, int(num_experts)) if num_experts else []
    experts = {d: (names.index(d), d) for d in domains if d in names}
    if oracle and not names:
        raise ModeError(f"--oracle-routing: {model_dir} is not a Mixture-of-Experts model")
    missing = [d for d in domains if d not in experts]
    if oracle and missing:
        raise ModeError(f"--oracle-routing: no expert is named {missing[0]!r} in {model_dir} "
                        f"(experts: {', '.join(names)}); name each --data after its expert")
    return experts


def evaluate_streams(model_dir: Path, streams: dict[str, list[int]], *, ctx: int = 128, batch_size: int = 8,
                     device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                     quiet: bool = False, own_weight: bool = False,
                     oracle: Optional[OracleRouting] = None) -> dict[str, DomainResult]:
    """Every domain's result on already tokenized text, in the order given, with a progress bar
    (tokens/s) on stderr unless `quiet`. `dtype`: of the layer-streamed run (a model loaded whole
    by transformers runs in float32). `own_weight`: report the weight of each domain's own expert;
    `oracle`: force routing to it (every domain must name one); both run the model whole."""
    check_ctx(ctx)
    if not (model_dir / "config.json").is_file():
        raise ModeError(f"MODEL: {model_dir} is not a model folder (no config.json)")
    experts = own_experts(model_dir, list(streams), oracle) if own_weight or oracle else {}
    total = sum(len(ids) for ids in streams.values())
    with tqdm(total=total, unit="tok", unit_scale=True, desc="eval", disable=quiet, leave=False) as bar:
        streamed = read_json(model_dir / "config.json", "MODEL").get("model_type") in STREAMED_TYPES
        if streamed and not experts:
            return _evaluate_streamed(ModelFolder.open(model_dir, "MODEL"), streams, ctx, batch_size, device, dtype,
                                      bar)
        model = load_model(model_dir, device)
        results = {}
        for name, ids in streams.items():
            bar.set_description(f"eval {name}")
            results[name] = evaluate_domain(model, ids, ctx, batch_size, device, experts.get(name), oracle,
                                            progress=bar.update)
        return results


def evaluate(model_dir: Path, data: dict[str, Path], *, ctx: int = 128, batch_size: int = 8,
             max_tokens: int = 50_000, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
             quiet: bool = False, own_weight: bool = False,
             oracle: Optional[OracleRouting] = None) -> dict[str, DomainResult]:
    """Every domain's result, in the order given."""
    ModelFolder.open_to_load(model_dir, "MODEL")  # before reading any text
    streams = tokenize_domains(model_dir, data, max_tokens)
    return evaluate_streams(model_dir, streams, ctx=ctx, batch_size=batch_size, device=device, dtype=dtype,
                            quiet=quiet, own_weight=own_weight, oracle=oracle)


def to_json(results: dict[str, DomainResult]) -> dict:
    return {"domains": {name: asdict(r) for name, r in results.items()}}


def format_table(results: dict[str, DomainResult], names: list[str]) -> str:
    """Perplexity per domain, then each domain's routing shares (layer x expert) for MoE models."""
    width = max(len(n) for n in [*results, "domain"])
    lines = [f"{'domain':<{width}}  {'tokens':>8}  {'perplexity':>10}"]
    lines += [f"{n:<{width}}  {r.tokens:>8}  {r.perplexity:>10.3f}" for n, r in results.items()]
    for domain, r in results.items():
        if r.routing is None:
            continue
        col = max(6, *(len(n) for n in names))
        lines += ["", f"routing of {domain} (share of its tokens that each expert gets, top-k)",
                  "layer  " + "  ".join(f"{n:>{col}}" for n in names)]
        lines += [f"{layer:>5}  " + "  ".join(f"{s:>{col}.3f}" for s in row) for layer, row in enumerate(r.routing)]
        if r.own_weight is not None:
            lines += ["", *format_own_weight(domain, r.own_weight)]
    return "\n".join(lines)


def format_own_weight(domain: str, own: OwnWeight) -> list[str]:
    """Per layer: the mean weight of the domain's expert and how its tokens spread (shares of tokens)."""
    half, high = BINS // 2, int(BINS * 0.9)
    lines = [f"weight of {domain}'s own expert ({own.expert}) per token",
             "layer    mean  not chosen  below 0.5  0.9 or more"]
    for layer, (mean, zero, hist) in enumerate(zip(own.mean, own.not_chosen, own.histogram)):
        lines.append(f"{layer:>5}  {mean:6.3f}  {zero:10.3f}  {sum(hist[:half]):9.3f}  {sum(hist[high:]):11.3f}")
    return lines
