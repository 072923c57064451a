"""A causal LM (dense, or the MoE) run one decoder layer at a time: eval's forward and the
forward-backward that trains the routers, with memory bounded by one layer, not the model.

Forward (eval, routing reports): the activations of a group of batches go through layer 0, then
layer 1, ..., each layer read once for the group; the final norm and the LM head score them in
chunks of tokens, so the [tokens, vocab] logits never exist whole.

Training step (objective lm, gradients for the routers only): a forward sweep with no autograd
keeps only each layer's input activations and its residual stream after attention (two
[tokens, hidden] tensors a layer); the head gives the loss and its gradient with respect to the
last hidden state, computed by hand chunk by chunk; then, from the top layer down, each layer is
read again, re-run from what was saved with autograd, and back-propagated with the gradient from
above, which yields its router's gradient and the gradient for the layer below. The re-run skips
what back-propagation does not need: the outputs of the experts' down projections and of o_proj
(their input gradients are one matmul each, done without autograd; see SparseMoeBlock.grad_surrogate),
and layer 0's attention (the embedding needs no gradient). The loss is
the training loss of the output format's transformers class (every format's: mean next-token
cross-entropy over the real tokens plus router_aux_loss_coef times the load-balancing loss over
all layers); the balancing loss couples
the layers only through each expert's top-k count over all layers, which the forward sweep
knows, so each layer's share of its gradient is local.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from mergekit_mode.formats import families
from mergekit_mode.layerwise import Batch, LayerStream

# Logits computed at once by the head: tokens x vocab floats (32 MB), whatever the batch.
HEAD_CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class Head:
    """The final RMSNorm and the LM head (the embedding when tied), float32 on the device."""

    norm: torch.Tensor  # [hidden], float32
    weight: torch.Tensor  # [vocab, hidden], in the compute dtype (the logits' matmul is large)
    eps: float

    @classmethod
    def load(cls, stream: LayerStream) -> "Head":
        tied = bool(getattr(stream.config, "tie_word_embeddings", False))
        weight = stream.weights((families.EMBED if tied else families.LM_HEAD).name)
        norm = stream.weights(families.FINAL_NORM.name)
        return cls(norm.to(stream.device, torch.float32), weight.to(stream.device, stream.dtype),
                   float(stream.config.rms_norm_eps))

    def _scale(self, h: torch.Tensor) -> torch.Tensor:
        return torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)

    def loss(self, h: torch.Tensor, targets: torch.Tensor, grad: bool) -> tuple[float, Optional[torch.Tensor]]:
        """(sum of the next-token cross-entropy over the rows of h [n, hidden] with their
        targets [n], its gradient with respect to h (float32) when `grad`). The norm and the
        softmax run in float32, the two matmuls in the compute dtype."""
        chunk = max(1, HEAD_CHUNK_ELEMENTS // self.weight.shape[0])
        total = 0.0
        grads = []
        for first in range(0, len(h), chunk):
            x, y = h[first:first + chunk].float(), targets[first:first + chunk]
            r = self._scale(x)
            u = self.norm * (x * r)
            logits = (u.to(self.weight.dtype) @ self.weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += float((lse - logits.gather(1, y[:, None])[:, 0]).sum())
            if grad:
                # d CE / d logits = softmax - one-hot; then back through the head and the RMSNorm
                probs = torch.exp(logits.sub_(lse[:, None]))
                probs[torch.arange(len(y), device=y.device), y] -= 1
                gw = (probs.to(self.weight.dtype) @ self.weight).float() * self.norm
                grads.append(r * gw - x * r.pow(3) * (x * gw).mean(-1, keepdim=True))
        return total, (torch.cat(grads) if grad else None)


@dataclass(frozen=True)
class MoeShape:
    num_experts: int
    top_k: int


class StreamedLM:
    """The stream's model: dense layers, or MoE layers (in the stream's moe_format) with `routers`
    (one [experts, hidden] tensor per layer) and, in formats with a shared expert, `shared_gates`
    (one [1, hidden] per layer); a trainer passes leaves that require grad."""

    def __init__(self, stream: LayerStream, moe: Optional[MoeShape] = None,
                 routers: Optional[list[torch.Tensor]] = None, shared_gates: Optional[list[torch.Tensor]] = None
                 ) -> None:
        self.stream, self.moe, self.routers, self.shared_gates = stream, moe, routers, shared_gates
        self.device = stream.device
        self._head: Optional[Head] = None

    @property
    def head(self) -> Head:
        """Read on first use (a routing report needs none), then kept: it never changes."""
        if self._head is None:
            self._head = Head.load(self.stream)
        return self._head

    def layer(self, index: int, grad: bool = False) -> nn.Module:
        """Decoder layer `index`; with `grad`, its MoE block uses the trainer's leaves themselves."""
        if self.moe is None:
            return self.stream.decoder_layer(index)

        def mine(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return t if grad or t is None else t.detach()

        gate = self.shared_gates[index] if self.shared_gates else None
        block = self.stream.moe_block(self.stream.moe_format, index, mine(self.routers[index]), self.moe.num_experts,
                                      self.moe.top_k, mine(gate))
        return self.stream.decoder_layer(index, block)

    @torch.no_grad()
    def forward(self, batches: list[Batch], progress: Callable[[float], None] = lambda _: None,
                router_logits: Optional[Callable[[int, int, torch.Tensor], None]] = None, score: bool = True
                ) -> tuple[float, int]:
        """(summed next-token loss, scored tokens) of the batches, run layer-major: each layer is
        read once for all of them. `router_logits(layer, batch, logits)` receives each MoE
        layer's router logits of the batch's real tokens [tokens, experts]; `progress` the share
        of the layers done so far (1.0 exactly after the last, so a caller's count ends at its total).
        With `score` False the head is skipped."""
        stream = self.stream
        hidden = stream.embed(batches)
        for index in range(stream.num_layers):
            layer = self.layer(index)
            for i, batch in enumerate(batches):
                hidden[i] = stream.forward(layer, hidden[i].to(self.device), batch).cpu()
                if router_logits is not None and self.moe is not None:
                    router_logits(index, i, batch.real(_per_token(layer.mlp.router_logits, batch)))
            progress((index + 1) / stream.num_layers)
        loss, scored = 0.0, 0
        for h, batch in zip(hidden if score else [], batches):
            targets = batch.targets().reshape(-1)
            keep = targets != -100
            part, _ = self.head.loss(h.reshape(-1, h.shape[-1])[keep].to(self.device), targets[keep].to(self.device),
                                     grad=False)
            loss += part
            scored += int(keep.sum())
        return loss, scored

    def train_step(self, batch: Batch, aux_coef: float) -> float:
        """One forward-backward of the format's training loss on `batch`: the routers' (and shared
        gates') `.grad` receive its gradient (accumulated). Returns the loss."""
        stream, moe = self.stream, self.moe
        targets = batch.targets().to(self.device)
        keep = targets.reshape(-1) != -100
        scored = int(keep.sum())
        x = stream.embed([batch])[0].to(self.device)
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, residual after attention) per layer
        counts = torch.zeros(moe.num_experts, device=self.device)
        with torch.no_grad():
            for index in range(stream.num_layers):
                layer = self.layer(index)
                residual = stream.attend(layer, x, batch)
                saved.append((x, residual))
                x, _ = stream.feed_forward(layer, residual)
                counts += topk_counts(batch.real(_per_token(layer.mlp.router_logits, batch)), moe.top_k)
        lm_loss, grad = self.head.loss(x.reshape(-1, x.shape[-1])[keep], targets.reshape(-1)[keep], grad=True)
        g = torch.zeros(x.shape, dtype=torch.float32, device=self.device).reshape(-1, x.shape[-1])
        g[keep] = grad / scored
        g = g.reshape(x.shape).to(x.dtype)
        # balancing loss = E * sum_e (count_e / R) * (prob_sum_e / R), R = layers x real tokens
        rows = stream.num_layers * batch.tokens
        aux_scale = aux_coef * moe.num_experts / rows ** 2
        aux = 0.0
        for index in reversed(range(stream.num_layers)):
            x, residual = saved.pop()
            layer = self.layer(index, grad=True)
            with torch.enable_grad():
                # the MoE block: its router's gradient, and the gradient at its residual input
                residual.requires_grad_(index > 0)
                surrogate = layer.mlp.grad_surrogate(layer.post_attention_layernorm(residual), g)
                probs = torch.softmax(batch.real(_per_token(layer.mlp.router_logits, batch)), dim=-1)
                layer_aux = probs.sum(0) @ counts
                (surrogate + layer_aux * aux_scale).backward()
                aux += float(layer_aux.detach())
                if index == 0:
                    break  # the embedding needs no gradient
                g = g + residual.grad
                # the attention block: the gradient at the layer's input
                x.requires_grad_(True)
                values = stream.attention_values(layer, x, batch)
                with torch.no_grad():
                    back = g @ layer.self_attn.o_proj.weight
                (values * back).sum().backward()
                g = g + x.grad
        return lm_loss / scored + aux_coef * aux * moe.num_experts / rows ** 2


def _per_token(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """A MoE block's [rows x width, experts] router logits as [rows, width, experts]."""
    return logits.reshape(*batch.ids.shape, -1)


def topk_counts(logits: torch.Tensor, k: int) -> torch.Tensor:
    """How many of the tokens (rows of [tokens, experts] logits) have each expert in their top k."""
    return torch.bincount(logits.topk(k, dim=-1).indices.flatten(), minlength=logits.shape[-1]).to(torch.float32)
