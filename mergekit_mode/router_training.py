"""Training only the routers (router.mode trained); experts, attention, norms and embeddings stay frozen.

Two objectives:
- domain: each layer's router is a linear classifier that learns to send a token to the expert
  whose data it came from. Layers are trained in order on the merged MoE run layer by layer:
  layer l's router sees the router inputs that layer l of the finished model will see (its
  earlier layers already route with their trained routers), not the dense base's. Cheap: a
  layer and the activations in memory, a few hundred small Adam steps per layer.
- lm: the whole MoE (the output format's transformers class) with the next-token loss plus its
  load-balancing loss, gradients into the router weights only. It holds the whole model, so it
  is for small models or a GPU. CONTEXT.md measured that domain accuracy alone (85-97% per layer)
  can still cost perplexity when experts are poor outside their domain; this objective trains
  what matters (300 steps, batch 8 x 128, lr 3e-3 from a classifier init reached 0.99x-1.18x of
  each expert's own perplexity there).
Both report top-1 routing accuracy per layer on the held-out documents.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mergekit_mode.calibration import ExpertTexts, Sequence
from mergekit_mode.executor import execute
from mergekit_mode.inputs import TensorReader
from mergekit_mode.layerwise import Batch, LayerStream, PlanWeights, make_batches
from mergekit_mode.plan import BASE, Gates, Plan
from mergekit_mode.router_modes import Fit
from mergekit_mode.routers import STREAM_BATCH, RouterContext, shared_gates
from mergekit_mode.writer import Entry, ShardedWriter


def _labelled(texts: list[ExpertTexts], held_out: bool) -> tuple[list[Sequence], list[int]]:
    sequences, labels = [], []
    for e, t in enumerate(texts):
        chosen = t.held_out if held_out else t.train
        sequences += chosen
        labels += [e] * len(chosen)
    return sequences, labels


def routing_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[float, float]:
    """(share of tokens whose top expert is their domain's, share whose domain expert is in the top k)."""
    top1 = (logits.argmax(-1) == labels).float().mean().item()
    topk = (logits.topk(k, dim=-1).indices == labels[:, None]).any(-1).float().mean().item()
    return top1, topk


def report_accuracy(accuracy: list[tuple[float, float]], k: int, tokens: int) -> None:
    """Print the held-out routing accuracy per layer (stderr, beside the progress bars)."""
    if not accuracy:
        return
    lines = [f"held-out routing accuracy ({tokens} tokens)", f"  layer   top-1  domain in top-{k}"]
    lines += [f"  {i:>5}  {a:6.1%}  {b:15.1%}" for i, (a, b) in enumerate(accuracy)]
    tqdm.write("\n".join(lines), file=sys.stderr)


def _progress(total: int, desc: str, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="step", disable=quiet, leave=False)


def train_domain(
    plan: Plan, texts: list[ExpertTexts], init: list[torch.Tensor], ctx: RouterContext
) -> list[torch.Tensor]:
    """Per layer, in order: capture the MoE's router inputs, fit the router with cross-entropy to
    the token's domain, then run the layer with the fitted router to feed the next one. Each
    layer runs twice (its outputs depend on the router being fitted), a small price next to
    loading the whole MoE."""
    spec = plan.recipe.recipe.router.training
    top_k = plan.top_k
    train_seqs, train_labels = _labelled(texts, held_out=False)
    held_seqs, held_labels = _labelled(texts, held_out=True)
    batches = make_batches(train_seqs + held_seqs, STREAM_BATCH)
    labels = _token_values(batches, train_labels + held_labels)
    is_train = _token_values(batches, [1] * len(train_seqs) + [0] * len(held_seqs)).bool()
    gen = torch.Generator().manual_seed(plan.recipe.recipe.router.seed)
    tokens_per_step = spec.batch_size * plan.recipe.recipe.router.seq_len
    routers, accuracy = [], []
    fit = spec.fit("domain")
    shared = shared_gates(plan)
    bar = _progress(fit.steps * len(init), "Training routers (domain)", ctx.quiet)
    with TensorReader() as reader, bar:
        stream = LayerStream(plan.inputs[BASE], PlanWeights(plan, reader, ctx.device), batches, ctx.device)
        hidden = stream.embed()
        for index in range(stream.num_layers):
            moe = stream.moe(plan, index, init[index].clone(), shared[index] if shared else None)
            layer = stream.decoder_layer(index, moe)
            _, router_inputs = stream.run(layer, hidden)
            x = torch.cat([b.real(r) for r, b in zip(router_inputs, batches)])
            weight = _fit(x[is_train], labels[is_train], init[index], fit, tokens_per_step, gen, ctx.device, bar)
            if held_seqs:
                accuracy.append(routing_accuracy(x[~is_train] @ weight.T, labels[~is_train], top_k))
            with torch.no_grad():
                moe.router.copy_(weight)
            hidden, _ = stream.run(layer, hidden)
            routers.append(weight)
    report_accuracy(accuracy, top_k, int((~is_train).sum()))
    return routers


def _token_values(batches: list[Batch], per_sequence: list[int]) -> torch.Tensor:
    """A per-sequence value repeated over each sequence's real tokens, in Batch.real order."""
    values, start = [], 0
    for b in batches:
        rows = torch.tensor(per_sequence[start:start + len(b.lengths)])
        values.append(b.real(rows[:, None].expand(b.ids.shape)))
        start += len(b.lengths)
    return torch.cat(values)


def _fit(x: torch.Tensor, y: torch.Tensor, init: torch.Tensor, fit: Fit, tokens_per_step: int,
         gen: torch.Generator, device: torch.device, bar: tqdm) -> torch.Tensor:
    """Adam on softmax cross-entropy of one router, minibatches of batch_size x seq_len tokens."""
    x, y = x.to(device), y.to(device)
    weight = init.clone().to(device).requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=fit.lr)
    for _ in range(fit.steps):
        pick = torch.randint(len(x), (tokens_per_step,), generator=gen).to(device)
        loss = F.cross_entropy(x[pick] @ weight.T, y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update()
        bar.set_postfix_str(f"loss {loss.item():.3f}", refresh=False)
    return weight.detach().cpu()


def train_lm(plan: Plan, texts: list[ExpertTexts], init: list[torch.Tensor], ctx: RouterContext) -> Gates:
    """Next-token loss plus load balancing of the whole MoE (built with the init routers in a
    temporary folder and loaded by the format's transformers class), Adam on the router weights
    only, and on the shared expert's gates in formats that have one."""
    spec = plan.recipe.recipe.router.training
    top_k = plan.top_k
    fmt = plan.format
    with tempfile.TemporaryDirectory(prefix="mergekit-mode-lm-") as tmp:
        _write_moe(plan, Gates(init, shared_gates(plan)), Path(tmp), ctx.device)
        model = fmt.model_class().from_pretrained(tmp, dtype=torch.float32, trust_remote_code=False,
                                                  local_files_only=True).to(ctx.device).eval()
    model.requires_grad_(False)
    gates = [layer.get_parameter(fmt.router_parameter) for layer in model.model.layers]
    shared = ([layer.get_parameter(fmt.shared_gate_parameter) for layer in model.model.layers]
              if plan.shared is not None else [])
    for gate in gates + shared:
        gate.requires_grad_(True)
    fit = spec.fit("lm")
    opt = torch.optim.Adam(gates + shared, lr=fit.lr)
    train_seqs, _ = _labelled(texts, held_out=False)
    rng = random.Random(plan.recipe.recipe.router.seed)
    with _progress(fit.steps, "Training routers (lm)", ctx.quiet) as bar:
        for _ in range(fit.steps):
            batch = make_batches(rng.choices(train_seqs, k=spec.batch_size), spec.batch_size)[0]
            loss = _lm_forward(model, batch, ctx.device, labels=True).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update()
            bar.set_postfix_str(f"loss {loss.item():.3f}", refresh=False)
    _report_lm_accuracy(model, texts, spec.batch_size, top_k, ctx.device)
    return Gates([gate.detach().float().cpu() for gate in gates], [gate.detach().float().cpu() for gate in shared])


def _lm_forward(model, batch: Batch, device: torch.device, labels: bool):
    ids = batch.ids.to(device)
    mask = (torch.arange(ids.shape[1])[None, :] < batch.lengths[:, None]).long().to(device)
    targets = ids.masked_fill(mask == 0, -100) if labels else None
    return model(input_ids=ids, attention_mask=mask, labels=targets, output_router_logits=True)


@torch.no_grad()
def _report_lm_accuracy(model, texts: list[ExpertTexts], batch_size: int, top_k: int, device: torch.device) -> None:
    held_seqs, held_labels = _labelled(texts, held_out=True)
    if not held_seqs:
        return
    batches = make_batches(held_seqs, batch_size)
    labels = _token_values(batches, held_labels)
    per_layer: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    for b in batches:
        out = _lm_forward(model, b, device, labels=False)
        for layer, logits in enumerate(out.router_logits):
            per_layer[layer].append(b.real(logits.float().cpu().reshape(*b.ids.shape, -1)))
    report_accuracy([routing_accuracy(torch.cat(l), labels, top_k) for l in per_layer], top_k, len(labels))


def _write_moe(plan: Plan, gates: Gates, folder: Path, device: torch.device) -> None:
    """The plan's model with these routers, float32, in `folder` (weights and config only)."""
    entries = [Entry(t.name, t.shape, torch.float32) for t in plan.tensors]
    tensors = tuple(replace(t, dtype=torch.float32) for t in plan.tensors)
    float_plan = replace(plan, dtype=torch.float32, tensors=tensors)
    writer = ShardedWriter(folder, entries, plan.recipe.recipe.output.shard_size)
    try:
        execute(float_plan, gates, writer, device, lambda _item: None)
    finally:
        writer.abort()
    config = {**plan.config, "dtype": "float32", "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
