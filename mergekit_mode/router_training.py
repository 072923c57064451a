"""Training only the routers (router.mode trained); experts, attention, norms and embeddings stay frozen.

Two objectives:
- domain: each layer's router is a linear classifier that learns to send a token to the expert
  whose data it came from. Layers are trained in order on the merged MoE run layer by layer:
  layer l's router sees the router inputs that layer l of the finished model will see (its
  earlier layers already route with their trained routers), not the dense base's. Cheap: a
  layer and the activations in memory, a few hundred small Adam steps per layer.
- lm: the MoE's next-token loss plus its load-balancing loss (the training loss of the output
  format's transformers class), gradients into the router weights (and the shared expert's gates
  in formats that have one) only, run one layer at a time forward and
  backward (streamed.py), so memory is one layer, not the model. CONTEXT.md measured that domain
  accuracy alone (85-97% per layer) can still cost perplexity when experts are poor outside their
  domain; this objective trains what matters (300 steps, batch 8 x 128, lr 3e-3 from a
  classifier init reached 0.99x-1.18x of each expert's own perplexity there).
Both report top-1 routing accuracy per layer on the held-out documents.
"""

from __future__ import annotations

import math
import random
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mergekit_mode.calibration import ExpertTexts, Sequence
from mergekit_mode.inputs import TensorReader
from mergekit_mode.layerwise import Batch, LayerStream, PlanWeights, pack, resident_budget
from mergekit_mode.plan import BASE, Gates, Plan
from mergekit_mode.router_modes import MIN_GAIN, Fit
from mergekit_mode.routers import STREAM_BATCH, RouterContext, shared_gates
from mergekit_mode.streamed import MoeShape, StreamedLM


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
    """Per layer, in order: run the MoE layer's attention block to get its router inputs, fit the
    router with cross-entropy to the token's domain, then run the layer's MoE block with the
    fitted router to feed the next layer (attention runs once: its output does not depend on
    the router being fitted)."""
    spec = plan.recipe.recipe.router.training
    top_k = plan.top_k
    shared = shared_gates(plan)
    train_seqs, train_labels = _labelled(texts, held_out=False)
    held_seqs, held_labels = _labelled(texts, held_out=True)
    batches = pack(train_seqs + held_seqs, plan.recipe.recipe.router.seq_len, STREAM_BATCH)
    labels = _token_values(batches, train_labels + held_labels)
    is_train = _token_values(batches, [1] * len(train_seqs) + [0] * len(held_seqs)).bool()
    gen = torch.Generator().manual_seed(plan.recipe.recipe.router.seed)
    tokens_per_step = spec.batch_size * plan.recipe.recipe.router.seq_len
    routers, accuracy = [], []
    fit = spec.fit("domain")
    bar = _progress(fit.steps * len(init), "Training routers (domain)", ctx.quiet)
    with TensorReader() as reader, bar:
        stream = LayerStream(plan.inputs[BASE], PlanWeights(plan, reader, ctx.device), batches, ctx.device, ctx.dtype)
        hidden = stream.embed()
        for index in range(stream.num_layers):
            router = init[index].clone().to(ctx.device)
            layer = stream.decoder_layer(index, stream.moe(plan, index, router, shared[index] if shared else None))
            with torch.no_grad():
                residual = [stream.attend(layer, h.to(ctx.device), b) for h, b in zip(hidden, batches)]
                router_inputs = [layer.post_attention_layernorm(r) for r in residual]
            x = torch.cat([b.real(u).float().cpu() for u, b in zip(router_inputs, batches)])
            weight = _fit(x[is_train], labels[is_train], init[index], fit, tokens_per_step, gen, ctx.device, bar)
            if held_seqs:
                accuracy.append(routing_accuracy(x[~is_train] @ weight.T, labels[~is_train], top_k))
            router.copy_(weight)
            with torch.no_grad():
                hidden = [(r + layer.mlp(u)).cpu() for r, u in zip(residual, router_inputs)]
            routers.append(weight)
    report_accuracy(accuracy, top_k, int((~is_train).sum()))
    return routers


def _token_values(batches: list[Batch], per_sequence: list[int]) -> torch.Tensor:
    """A per-sequence value repeated over each sequence's real tokens, in Batch.real order."""
    values = torch.tensor(per_sequence)
    return torch.cat([torch.repeat_interleave(values[b.seq], b.lengths) for b in batches])


def _fit(x: torch.Tensor, y: torch.Tensor, init: torch.Tensor, fit: Fit, tokens_per_step: int,
         gen: torch.Generator, device: torch.device, bar: tqdm) -> torch.Tensor:
    """Adam on softmax cross-entropy of one router, minibatches of batch_size x seq_len tokens."""
    x, y = x.to(device), y.to(device)
    weight = init.clone().to(device).requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=fit.lr)
    for _ in range(fit.steps):
        pick = torch.randint(len(x), (tokens_per_step,), generator=gen).to(device)
        # index_select: the same rows as x[pick], several times faster on a CPU
        loss = F.cross_entropy(x.index_select(0, pick) @ weight.T, y.index_select(0, pick))
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update()
        bar.set_postfix_str(f"loss {loss.item():.3f}", refresh=False)
    return weight.detach().cpu()


def train_lm(plan: Plan, texts: list[ExpertTexts], init: list[torch.Tensor], ctx: RouterContext) -> Gates:
    """Next-token loss plus load balancing of the MoE (the training loss of the format's
    transformers class), Adam on the router weights only, and on the shared expert's gates in
    formats that have one; the model run and back-propagated one layer at a time (streamed.py):
    memory is one layer and the activations of one batch, whatever the depth. Each step's
    sequences are packed into rows of seq_len tokens, so padding costs nothing. Every
    check_every steps the MoE's loss on the held-out documents decides whether to go on
    (EarlyStop): from a domain-classifier init the lm objective often has little left to gain,
    and on a real model each step costs seconds to minutes."""
    spec = plan.recipe.recipe.router.training
    top_k = plan.top_k
    fit = spec.fit("lm")
    routers = [r.clone().to(ctx.device).requires_grad_(True) for r in init]
    shared = [g.clone().to(ctx.device).requires_grad_(True) for g in shared_gates(plan)]
    opt = torch.optim.Adam(routers + shared, lr=fit.lr)
    train_seqs, _ = _labelled(texts, held_out=False)
    held_seqs, held_labels = _labelled(texts, held_out=True)
    rng = random.Random(plan.recipe.recipe.router.seed)
    seq_len = plan.recipe.recipe.router.seq_len
    held = pack(held_seqs, seq_len, STREAM_BATCH) if held_seqs else []
    stop = EarlyStop(spec.patience if held else 0)
    with TensorReader() as reader, _progress(fit.steps, "Training routers (lm)", ctx.quiet) as bar:
        stream = LayerStream(plan.inputs[BASE], PlanWeights(plan, reader, ctx.device), [], ctx.device, ctx.dtype,
                             moe_format=plan.format, resident_bytes=resident_budget(ctx.device, ctx.resident_bytes))
        stream.keep_rows(torch.tensor([t for seq in train_seqs + held_seqs for t in seq], dtype=torch.long))
        lm = StreamedLM(stream, MoeShape(plan.num_experts, top_k), routers, shared or None)
        checked, best_logits = "", None
        for step in range(fit.steps + 1):
            if stop.patience and (step % spec.check_every == 0 or step == fit.steps):
                loss, logits = _held_out_pass(lm, held, score=True)
                checked = f", held-out ppl {math.exp(loss):.3f} (step {step})"
                bar.set_postfix_str(checked[2:])
                done = stop.check(step, loss, routers + shared)
                if stop.best_step == step:  # the kept routers' logits: the accuracy report needs no pass of its own
                    best_logits = logits
                if done:
                    break
            if step == fit.steps:
                break
            batch = pack(rng.choices(train_seqs, k=spec.batch_size), seq_len, spec.batch_size)[0]
            loss = lm.train_step(batch, float(plan.config["router_aux_loss_coef"]))
            opt.step()
            opt.zero_grad()
            bar.update()
            bar.set_postfix_str(f"loss {loss:.3f}{checked}", refresh=False)
        if stop.patience:
            stop.restore(routers + shared)
            if not ctx.quiet:
                tqdm.write(stop.summary(step, fit.steps), file=sys.stderr)
        if held:
            logits = best_logits if best_logits is not None else _held_out_pass(lm, held, score=False)[1]
            labels = _token_values(held, held_labels)
            report_accuracy([routing_accuracy(l, labels, top_k) for l in logits], top_k, len(labels))
    return Gates([r.detach().float().cpu() for r in routers], [g.detach().float().cpu() for g in shared])


class EarlyStop:
    """Early stopping on the held-out loss: stop once `patience` checks in a row have each failed
    to come MIN_GAIN nats (about MIN_GAIN of perplexity) below the loss of the last check that
    did, then go back to the parameters of the lowest loss seen (which also picks the best of the
    last few noisy steps)."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_loss = self.bar = math.inf
        self.best_step, self.misses = 0, 0
        self.kept: list[torch.Tensor] = []

    def check(self, step: int, loss: float, params: list[torch.Tensor]) -> bool:
        """Record the held-out mean loss at `step`; True when training should stop."""
        if loss < self.best_loss:
            self.best_loss, self.best_step = loss, step
            self.kept = [p.detach().clone() for p in params]
        if loss < self.bar - MIN_GAIN:
            self.bar, self.misses = loss, 0
        else:
            self.misses += 1
        return self.misses >= self.patience

    def restore(self, params: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, kept in zip(params, self.kept):
                p.copy_(kept)

    def summary(self, step: int, steps: int) -> str:
        ran = f"stopped early at step {step} of {steps}" if step < steps else f"ran all {steps} steps"
        return (f"lm training {ran}: kept the routers of step {self.best_step} "
                f"(held-out perplexity {math.exp(self.best_loss):.4f})")


def _held_out_pass(lm: StreamedLM, held: list[Batch], score: bool) -> tuple[float, list[torch.Tensor]]:
    """(mean next-token loss of the held-out batches, nan without `score`; each layer's router
    logits of their real tokens, in Batch.real order)."""
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(lm.stream.num_layers)]
    loss, scored = lm.forward(held, score=score,
                              router_logits=lambda layer, _b, logits: per_layer[layer].append(logits.float().cpu()))
    return (loss / scored if score else math.nan), [torch.cat(l) for l in per_layer]
