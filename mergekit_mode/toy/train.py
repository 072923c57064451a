"""Plain-torch CPU training of tiny models: a mixed-domain base and one expert per domain.

The project needs real domain experts (not just noisy copies) to show that routing matters:
each expert must beat the base on its own domain. A few hundred AdamW steps on 128-token
blocks get there in about a minute on two cores. The only randomness, the order of the
training blocks (and a LoRA adapter's initial A), comes from ``seed``, so reruns give
byte-identical weights (checked with 1 and 2 threads on one machine).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .tokenizer import copy_tokenizer


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (None: leave as is), restoring the setting afterwards.

    Why: on a 2-core machine shared with other work, 2 OpenMP threads spin on each other and
    a training step became 10x slower than with 1 thread (2.4 s vs 0.2 s, measured); on an
    idle machine 2 threads are about 1.7x faster (50 vs 86 ms a step). The caller knows which
    case it is in.
    """
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def encode(tokenizer_dir: Path, text: str | list[str]) -> torch.Tensor:
    """Token ids of ``text`` as one 1-D stream, each document starting with BOS: a string holds
    one document per line (as router data files do), a list one document per item (multi-line
    documents such as source files)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = [doc for doc in (text.splitlines() if isinstance(text, str) else text) if doc]
    ids = [i for row in tokenizer(docs)["input_ids"] for i in row]
    return torch.tensor(ids, dtype=torch.long)


def to_blocks(ids: torch.Tensor, ctx: int) -> torch.Tensor:
    """Cut a stream into non-overlapping ``[n, ctx]`` blocks, dropping the ragged tail."""
    n = ids.numel() // ctx
    if n == 0:
        raise ValueError(f"text too short: {ids.numel()} tokens < ctx {ctx}")
    return ids[: n * ctx].view(n, ctx)


def pretrain(
    model_dir: Path,
    texts_by_domain: Mapping[str, str],
    steps: int,
    *,
    out_dir: Path | None = None,
    batch_size: int = 8,
    ctx: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    num_threads: int | None = None,
) -> Path:
    """Train the model in ``model_dir`` on an even mix of all domains; save to ``out_dir``.

    Each block holds one domain's text only; domains are sampled uniformly per block, so a
    domain with more text does not dominate. Saves in place when ``out_dir`` is None.
    """
    blocks = [to_blocks(encode(model_dir, text), ctx) for text in texts_by_domain.values()]
    gen = torch.Generator().manual_seed(seed)

    def batches() -> Iterator[torch.Tensor]:
        while True:
            domains = torch.randint(len(blocks), (batch_size,), generator=gen).tolist()
            yield torch.stack([blocks[d][torch.randint(len(blocks[d]), (1,), generator=gen)][0] for d in domains])

    with torch_threads(num_threads):
        return _train_and_save(model_dir, Path(out_dir or model_dir), batches(), steps, lr=lr)


def finetune(
    base_dir: Path,
    out_dir: Path,
    text: str | list[str],
    steps: int,
    *,
    mlp_only: bool = False,
    lora: dict | None = None,
    batch_size: int = 8,
    ctx: int = 128,
    lr: float = 5e-3,
    seed: int = 0,
    num_threads: int | None = None,
    device: str = "cpu",
) -> Path:
    """Fine-tune a copy of ``base_dir`` on ``text`` and save it (with tokenizer) to ``out_dir``.

    ``mlp_only`` trains only the MLP weights, so attention, norms and embeddings stay the
    base's - exactly the part a Mixture-of-Domain-Experts keeps shared. ``lora`` (peft
    LoraConfig arguments) trains a LoRA adapter instead and saves the adapter alone, as peft does.
    ``device`` trains there (a GPU makes the real-model benchmark's experts in seconds); the
    batches are still drawn on the CPU, so the order of the blocks does not depend on it.
    """
    blocks = to_blocks(encode(base_dir, text), ctx)
    gen = torch.Generator().manual_seed(seed)

    def batches() -> Iterator[torch.Tensor]:
        while True:
            yield blocks[torch.randint(len(blocks), (batch_size,), generator=gen)]

    with torch_threads(num_threads):
        return _train_and_save(base_dir, Path(out_dir), batches(), steps, lr=lr, mlp_only=mlp_only, lora=lora,
                               seed=seed, device=device)


def _train_and_save(
    src_dir: Path,
    out_dir: Path,
    batches: Iterator[torch.Tensor],
    steps: int,
    *,
    lr: float,
    mlp_only: bool = False,
    lora: dict | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """AdamW in float32, saved in the source checkpoint's dtype.

    The learning rate warms up over the first 10% of steps, then follows a cosine from
    ``lr`` down to ``0.1 * lr``. The models have no dropout, so the batches and a LoRA
    adapter's initial A (drawn from ``seed`` on the CPU, whatever the device) are the only
    randomness.
    """
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(src_dir, dtype="auto")
    save_dtype = model.dtype
    model.float().train()
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        with torch.random.fork_rng(devices=[]):  # peft draws A from the global generator
            torch.manual_seed(seed)
            model = get_peft_model(model, LoraConfig(**lora))  # freezes everything but A and B
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(not mlp_only or ".mlp." in name)
    model.to(device)
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(s, steps) / steps)),
    )
    bar = tqdm(zip(range(steps), batches), total=steps, desc=f"training {out_dir.name}", unit="step", leave=False)
    for _, batch in bar:
        batch = batch.to(device)
        loss = model(input_ids=batch, labels=batch).loss
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.cpu()
    (model if lora is not None else model.to(save_dtype)).save_pretrained(out_dir)  # an adapter stays float32
    if out_dir.resolve() != Path(src_dir).resolve():
        copy_tokenizer(src_dir, out_dir)
    return out_dir
