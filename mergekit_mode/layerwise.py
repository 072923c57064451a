"""A decoder stack run one layer at a time over many tokens: memory is one layer, not the model.

mergekit's `hidden` mode loads the whole base model to take its hidden states, which runs out of
memory on large bases, and so would evaluating or training a MoE whole. Here each decoder layer
is built from the config, its weights are read with `TensorReader` (plain reads, nothing stays
mapped), it runs over all batches, and the next layer reuses its memory: peak memory is about one
layer plus the activations of the tokens in flight, whatever the depth. The embedding is read
only at the rows the tokens use.

The layer is transformers' own decoder layer class of the folder's family or output format
(`LlamaDecoderLayer`, `Qwen3DecoderLayer`, `Qwen2MoeDecoderLayer`, ...), so attention (biases,
q/k norms), norms and rotary embeddings are the full model's. Weights come from a `Weights` source: `FolderWeights`
reads a model folder (a dense base, or a MoE checkpoint), `PlanWeights` computes the output's
own tensors as the executor writes them (the stem as `stem:` makes it, and each expert's MLP), so
the merged MoE runs exactly as it will load. The router input of a MoE layer is the MLP input,
the output of the layer's `post_attention_layernorm`, not the layer's input that mergekit uses.
A MoE layer's MLP is its output format's block (`OutputFormat.moe_block`) over the experts'
MLPs, with the shared expert of formats that have one.

Batches are packed: short sequences share a row back to back (each attends only to itself, with
its own positions), so padding does not cost compute; every real token's numbers equal a
forward of its sequence alone.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from importlib import import_module
from typing import Callable, Optional, Protocol
from weakref import WeakKeyDictionary

import torch
from torch import nn

from mergekit_mode.calibration import Sequence
from mergekit_mode.executor import compute_alone
from mergekit_mode import formats
from mergekit_mode.formats import families
from mergekit_mode.formats.base import OutputFormat
from mergekit_mode.formats.block import ExpertMlp
from mergekit_mode.formats.families import Role
from mergekit_mode.inputs import ModelFolder, TensorReader
from mergekit_mode.plan import Plan


class Weights(Protocol):
    """Tensors by checkpoint name (e.g. "model.layers.0.self_attn.q_proj.weight"), in the dtype
    they are stored or written in; the caller converts them into its float32 parameters."""

    def __call__(self, name: str) -> torch.Tensor: ...

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor: ...

    def shape(self, name: str) -> tuple[int, ...]: ...


class FolderWeights:
    """A model folder's own tensors."""

    def __init__(self, folder: ModelFolder, reader: TensorReader) -> None:
        self.folder, self.reader = folder, reader

    def __call__(self, name: str) -> torch.Tensor:
        return self.reader.read(self.folder.tensors[name])

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        return self.reader.read_rows(self.folder.tensors[name], ids)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.folder.tensors[name].shape


class PlanWeights:
    """The output's tensors, computed on demand exactly as the executor computes them for writing."""

    def __init__(self, plan: Plan, reader: TensorReader, device: torch.device) -> None:
        self.plan, self.reader, self.device = plan, reader, device
        self.items = {t.name: t for t in plan.tensors}

    def __call__(self, name: str) -> torch.Tensor:
        return compute_alone(self.items[name], self.plan, self.reader, self.device)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        return compute_alone(self.items[name], self.plan, self.reader, self.device, rows=ids)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.items[name].shape


def stem_config(base: ModelFolder):
    """The folder's transformers config, with SDPA attention."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**base.config)
    config._attn_implementation = "sdpa"
    return config


def _class(model_type: str, prefix: str, suffix: str) -> type:
    module = import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return getattr(module, f"{prefix}{suffix}")


@dataclass(frozen=True)
class Batch:
    """Token rows [rows, width]: sequences back to back in each row, then padding (id 0).

    `positions` restart at 0 with each sequence; `row`, `start` and `lengths` say where each
    sequence lies, and `seq` which of the packed list it is. Real tokens are listed sequence
    by sequence, in `seq` order."""

    ids: torch.Tensor
    positions: torch.Tensor
    row: torch.Tensor
    start: torch.Tensor
    lengths: torch.Tensor
    seq: torch.Tensor
    index: torch.Tensor  # flat position of every real token, sequence by sequence

    @property
    def packed(self) -> bool:
        """Some row holds more than one sequence (attention then needs a block mask)."""
        return bool((self.start > 0).any())

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    def real(self, x: torch.Tensor) -> torch.Tensor:
        """The real tokens of a [rows, width, ...] tensor, flattened to [tokens, ...]."""
        return x.reshape(-1, *x.shape[2:])[self.index.to(x.device)]

    def last(self, x: torch.Tensor) -> torch.Tensor:
        """Each sequence's last token of a [rows, width, ...] tensor."""
        return x[self.row, self.start + self.lengths - 1]

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Each sequence's mean over its tokens of a [rows, width, ...] tensor."""
        owner = torch.repeat_interleave(torch.arange(len(self.lengths)), self.lengths)
        sums = torch.zeros(len(self.lengths), *x.shape[2:], dtype=x.dtype).index_add_(0, owner, self.real(x))
        return sums / self.lengths.reshape(-1, *[1] * (x.dim() - 2)).to(x.dtype)

    def targets(self) -> torch.Tensor:
        """[rows, width]: each token's next token in its sequence; -100 after a sequence's last
        token and on padding (the positions that score nothing)."""
        out = torch.full_like(self.ids, -100)
        nxt = torch.cat([self.index[1:], self.index[:1]])
        scored = torch.ones(len(self.index), dtype=torch.bool)
        scored[torch.cumsum(self.lengths, 0) - 1] = False
        flat = out.view(-1)
        flat[self.index[scored]] = self.ids.view(-1)[nxt[scored]]
        return out

    def segments(self) -> torch.Tensor:
        """[rows, width]: which sequence each position belongs to (-1: padding)."""
        seg = torch.full_like(self.ids, -1)
        seg.view(-1)[self.index] = torch.repeat_interleave(torch.arange(len(self.lengths)), self.lengths)
        return seg


def _batch(sequences: list[Sequence], rows: list[list[int]], width: int, pad_id: int) -> Batch:
    """A batch of `rows`, each a list of indices into `sequences` placed back to back."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    placed: list[tuple[int, int, int, int]] = []  # (seq, row, start, length)
    for r, members in enumerate(rows):
        col = 0
        for s in members:
            n = len(sequences[s])
            ids[r, col:col + n] = torch.tensor(sequences[s], dtype=torch.long)
            positions[r, col:col + n] = torch.arange(n)
            placed.append((s, r, col, n))
            col += n
        positions[r, col:] = torch.arange(width - col) + (positions[r, col - 1] + 1 if col else 0)
    placed.sort()
    seq, row, start, lengths = (torch.tensor(v, dtype=torch.long) for v in zip(*placed))
    index = torch.cat([torch.arange(n) + r * width + c
                       for r, c, n in zip(row.tolist(), start.tolist(), lengths.tolist())])
    return Batch(ids, positions, row, start, lengths, seq, index)


def make_batches(sequences: list[Sequence], batch_size: int, pad_id: int = 0) -> list[Batch]:
    """One sequence per row, `batch_size` rows a batch, right-padded, in order."""
    batches = []
    for first in range(0, len(sequences), batch_size):
        chunk = sequences[first:first + batch_size]
        width = max(len(s) for s in chunk)
        batch = _batch(chunk, [[i] for i in range(len(chunk))], width, pad_id)
        batches.append(replace(batch, seq=batch.seq + first))
    return batches


def pack(sequences: list[Sequence], width: int, rows_per_batch: int, pad_id: int = 0) -> list[Batch]:
    """Sequences packed into rows of `width` tokens (longest first, each into the fullest row it
    fits: best-fit decreasing), `rows_per_batch` rows a batch. `seq` indexes `sequences`."""
    width = max([width, *(len(s) for s in sequences)])
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row), sorted
    for s in order:
        n = len(sequences[s])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, r = free.pop(at)
        else:
            space, r = width, len(rows)
            rows.append([])
        rows[r].append(s)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    batches = []
    for first in range(0, len(rows), rows_per_batch):
        chunk = rows[first:first + rows_per_batch]
        members = sorted(s for row in chunk for s in row)
        local = {s: i for i, s in enumerate(members)}
        batch = _batch([sequences[s] for s in members], [[local[s] for s in row] for row in chunk],
                       max(sum(len(sequences[s]) for s in row) for row in chunk), pad_id)
        batches.append(replace(batch, seq=torch.tensor(members, dtype=torch.long)[batch.seq]))
    return batches


# Weights read or computed once are kept up to this many bytes (as stored, e.g. bf16), so a small
# model is read once however often its layers run; larger ones stream, with memory still flat.
WEIGHT_CACHE_BYTES = 64 << 20
# The share of a CUDA device's free memory that resident layers may take by default (resident_budget).
RESIDENT_GPU_SHARE = 0.5
# Tokens per dense-MLP call in `run` (see _add_mlp).
MLP_CHUNK_TOKENS = 1024


def resident_budget(device: torch.device, requested: Optional[int] = None) -> int:
    """Bytes of layers a LayerStream keeps resident: `requested` if given; else on a CUDA device
    RESIDENT_GPU_SHARE of its free memory (a GPU that holds the MoE should not re-read it twice a
    step over PCIe); on the CPU none, so RAM stays one layer whatever the depth."""
    if requested is not None:
        return requested
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * RESIDENT_GPU_SHARE)
    return 0


class LayerStream:
    """A decoder stack of the folder's config, layer by layer, over batches of tokens.

    Layer modules are built once and refilled: `decoder_layer` and the MLPs of `moe_block`
    return modules that the next call of the same kind overwrites (one layer in memory). With
    `resident_bytes`, layers are kept filled, each its own module, while their parameters fit in
    that many bytes: a trainer that runs every layer twice a step for many steps then reads,
    merges and copies their weights once, not twice a step (the rest stream as before)."""

    def __init__(self, folder: ModelFolder, weights: Weights, batches: list[Batch], device: torch.device,
                 dtype: torch.dtype = torch.float32, moe_format: Optional[OutputFormat] = None,
                 resident_bytes: int = 0) -> None:
        self.model_type = folder.model_type  # the architecture and config are the folder's
        built = formats.of_config(folder.config)  # a MoE folder in an output format, or a dense base
        self._prefix = (built.architecture.removesuffix("ForCausalLM") if built
                        else families.family_of(folder.config, "MODEL").transformers_prefix)
        self.moe_format = moe_format or built  # the format of the MoE layers run (moe_block)
        self.weights = weights
        self.dtype = dtype  # of the layers' weights and activations (see build.compute_dtype)
        self._cache: dict[str, torch.Tensor] = {}
        self._cached_bytes = 0
        self._rows: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.batches = batches
        self.device = device
        self.config = stem_config(folder)
        self.num_layers = int(self.config.num_hidden_layers)
        self.hidden_size = int(self.config.hidden_size)
        self._rotary = _class(self.model_type, self._prefix, "RotaryEmbedding")(self.config).to(device)
        # Mistral's window; Qwen configs carry a sliding_window that use_sliding_window false turns off
        window = getattr(self.config, "sliding_window", None)
        self._window = window if window and getattr(self.config, "use_sliding_window", True) else None
        self._contexts: dict[int, tuple[Batch, tuple]] = {}
        self._shells: dict[str, nn.Module] = {}
        self._resident: dict[str, nn.Module] = {}  # by layer (decoder layers) or by tensor name (MLPs)
        self._resident_left = resident_bytes
        self._filled: WeakKeyDictionary[nn.Module, dict[str, str]] = WeakKeyDictionary()  # module -> its tensors

    # -- inputs of every layer: rotary embeddings and the attention mask of a batch

    def context(self, batch: Batch) -> tuple[Optional[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """(attention mask, rotary cos/sin) of a batch, made once per batch."""
        hit = self._contexts.get(id(batch))
        if hit is not None and hit[0] is batch:
            return hit[1]
        if len(self._contexts) > 256:
            self._contexts.clear()
        positions = batch.positions.to(self.device)
        rope = self._rotary(torch.zeros(1, device=self.device, dtype=self.dtype), positions)
        self._contexts[id(batch)] = (batch, (self._mask(batch), rope))
        return self._contexts[id(batch)][1]

    def _mask(self, batch: Batch) -> Optional[torch.Tensor]:
        """None (plain causal attention) unless sequences share rows or a sliding window applies:
        then a boolean [rows, 1, width, width] mask, True where a token may attend."""
        if not batch.packed and self._window is None:
            return None
        seg = batch.segments().to(self.device)
        width = seg.shape[1]
        i = torch.arange(width, device=self.device)
        allowed = (seg[:, :, None] == seg[:, None, :]) & (i[None, :] <= i[:, None])
        if self._window is not None:
            allowed &= (i[:, None] - i[None, :]) < self._window
        return allowed[:, None]

    def keep_rows(self, ids: torch.Tensor) -> None:
        """Read the embedding rows of `ids` once, for every later `embed` of batches made of them
        (a trainer's steps draw from one set of sequences)."""
        used = torch.unique(torch.cat([ids.reshape(-1), torch.zeros(1, dtype=torch.long)]))  # 0: padding
        self._rows = used, self.weights.rows(families.EMBED.name, used).to("cpu", self.dtype)

    def embed(self, batches: Optional[list[Batch]] = None) -> list[torch.Tensor]:
        """Layer 0's input per batch, on the CPU in the compute dtype: the embedding rows of the ids, read
        for the ids the batches use (not the whole vocabulary), or taken from `keep_rows`."""
        batches = self.batches if batches is None else batches
        ids = torch.cat([b.ids.reshape(-1) for b in batches])
        if self._rows is not None and bool(torch.isin(ids, self._rows[0]).all()):
            used, rows = self._rows
            inverse = torch.searchsorted(used, ids)
        else:
            used, inverse = torch.unique(ids, return_inverse=True)
            rows = self.weights.rows(families.EMBED.name, used).to("cpu", self.dtype)
        out, first = [], 0
        for b in batches:
            out.append(rows[inverse[first:first + b.ids.numel()]].reshape(*b.ids.shape, -1))
            first += b.ids.numel()
        return out

    # -- layers

    def decoder_layer(self, index: int, mlp: Optional[nn.Module] = None) -> nn.Module:
        """Decoder layer `index`; with `mlp`, its dense MLP replaced by that module (whose weights
        the caller has loaded), else the dense MLP read from the weights too."""
        kind = "dense" if mlp is None else "moe"
        layer = self._module(f"{kind}{index}", kind, lambda: self._empty_layer(dense=mlp is None))
        if mlp is not None:
            layer.mlp = mlp
        prefix = f"{families.LAYER_PREFIX}{index}."
        own = [n for n, _ in layer.named_parameters() if mlp is None or not n.startswith("mlp.")]
        self._fill(layer, {n: prefix + n for n in own})
        return layer

    def _mlp(self, key: str, names: dict[Role, str]) -> ExpertMlp:
        """A dense SwiGLU MLP (an expert, the shared expert) from the tensors named per role; `key`
        names its reused module."""
        shape = self.weights.shape(names[Role.GATE_PROJ])

        def make() -> ExpertMlp:
            return ExpertMlp(self.hidden_size, shape[0], self.device, self.dtype)

        mlp = self._module(names[Role.GATE_PROJ], key, make)
        if tuple(mlp.gate.shape) != tuple(shape):  # a shared shell of another size
            mlp = self._shells[key] = make()
        self._fill(mlp, {"gate": names[Role.GATE_PROJ], "up": names[Role.UP_PROJ], "down": names[Role.DOWN_PROJ]})
        return mlp

    def moe_block(self, fmt: OutputFormat, index: int, router: torch.Tensor, num_experts: int, top_k: int,
                  shared_gate: Optional[torch.Tensor] = None) -> nn.Module:
        """Layer `index`'s MoE block in format `fmt` over its experts' MLPs, with this router (and,
        in formats with a shared expert, the shared expert with this gate row)."""
        experts = [self._mlp(f"expert{e}", {role: fmt.expert_tensor(index, e, role) for role in fmt.experts})
                   for e in range(num_experts)]
        shared = None
        if fmt.shared_expert is not None:
            assert shared_gate is not None, f"{fmt.name} has a shared expert: give its gate"
            names = {role: fmt.shared_expert_tensor(index, role) for role in fmt.shared_expert}
            shared = (self._mlp("shared", names), shared_gate)
        return fmt.moe_block(router, experts, top_k, shared)

    def moe(self, plan: Plan, index: int, router: torch.Tensor, shared_gate: Optional[torch.Tensor] = None
            ) -> nn.Module:
        """Layer `index`'s MoE block of the plan's output (its format, experts and top-k)."""
        return self.moe_block(plan.format, index, router, plan.num_experts, plan.top_k, shared_gate)

    def _module(self, own: str, shared: str, make: Callable[[], nn.Module]) -> nn.Module:
        """The module named `own` (one layer's, one expert's) if it is resident; else a new one that
        becomes resident while the budget lasts; else the shell of its kind, `shared`."""
        module = self._resident.get(own)
        if module is None:
            module = self._shells.get(shared)
        if module is None:
            module = make()
            size = sum(p.numel() * p.element_size() for p in module.parameters())
            if size <= self._resident_left:
                self._resident_left -= size
                self._resident[own] = module
            else:
                self._shells[shared] = module
        return module

    def _empty_layer(self, dense: bool) -> nn.Module:
        """A transformers decoder layer with uninitialised parameters on the device: every one is
        loaded next, and a random init of a large layer costs seconds on a CPU. A MoE layer gets
        its MLP from the caller, so its own is never allocated."""
        with torch.device("meta"):
            layer = _class(self.model_type, self._prefix, "DecoderLayer")(self.config, 0).to(self.dtype)
            if not dense:
                layer.mlp = nn.Identity()
        # buffers would stay uninitialised: none exist in these modules (rotary is model-level)
        assert not list(layer.buffers()), "decoder layer has buffers"
        return layer.to_empty(device=self.device).eval().requires_grad_(False)

    def _fill(self, module: nn.Module, names: dict[str, str]) -> None:
        """Copy each named tensor into the module's parameter (converting to the compute dtype),
        unless the module holds them already (a resident one; the tensors never change)."""
        if self._filled.get(module) == names:
            return
        params = dict(module.named_parameters())
        with torch.no_grad():
            for param, tensor in names.items():
                params[param].copy_(self._weight(tensor))
        self._filled[module] = names

    def _weight(self, name: str) -> torch.Tensor:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        tensor = self.weights(name)
        if self._cached_bytes + tensor.nbytes <= WEIGHT_CACHE_BYTES:
            self._cache[name] = tensor
            self._cached_bytes += tensor.nbytes
        return tensor

    # -- running a layer

    def attend(self, layer: nn.Module, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The residual stream after the layer's attention block."""
        mask, rope = self.context(batch)
        h, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=mask, position_embeddings=rope)
        return x + h

    def attention_values(self, layer: nn.Module, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The attention block's output before its o_proj (for back-propagation, which needs
        o_proj's input gradient but not its forward)."""
        mask, rope = self.context(batch)
        o_proj, layer.self_attn.o_proj = layer.self_attn.o_proj, nn.Identity()
        try:
            values, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=mask,
                                        position_embeddings=rope)
        finally:
            layer.self_attn.o_proj = o_proj
        return values

    @staticmethod
    def feed_forward(layer: nn.Module, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the layer's output, the MLP's input, i.e. the router input) from the residual stream."""
        router_input = layer.post_attention_layernorm(residual)
        return residual + layer.mlp(router_input), router_input

    def forward(self, layer: nn.Module, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.feed_forward(layer, self.attend(layer, x, batch))[0]

    @torch.no_grad()
    def run(self, layer: nn.Module, hidden: list[torch.Tensor], mlp: bool = True,
            keep: Callable[[torch.Tensor, Batch], torch.Tensor] = lambda u, _batch: u
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(next hidden states in the compute dtype, what `keep` makes of the router inputs) per
        batch, on the CPU. `keep` gets each batch's router inputs in float32 [rows, width, hidden]
        (default: kept whole); a caller that needs less of them (pooled rows) keeps only that, not
        every batch's router inputs until the layer ends. Without `mlp`, no next hidden states:
        the last layer a caller needs only router inputs of, which spares its MLP, two thirds of a
        dense layer's arithmetic."""
        out, kept = [], []
        for h, batch in zip(hidden, self.batches):
            residual = self.attend(layer, h.to(self.device), batch)
            u = layer.post_attention_layernorm(residual)
            if mlp:
                out.append(_add_mlp(layer.mlp, u, residual).cpu())
            kept.append(keep(u.float().cpu(), batch))
        return out, kept


def _add_mlp(mlp: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + mlp(x), added in place into `residual`, MLP_CHUNK_TOKENS tokens at a time: the MLP's
    [tokens, intermediate] activations, several alive at once, are what peaks in a no-grad pass
    over a batch, and adding into the residual spares a copy of the output."""
    width = x.shape[-1]
    parts = x.reshape(-1, width).split(MLP_CHUNK_TOKENS)
    for part, into in zip(parts, residual.view(-1, width).split(MLP_CHUNK_TOKENS)):
        into += mlp(part)
    return residual
