"""LoRA adapters as experts: reading a peft adapter folder and merging it exactly as peft does.

An adapter is opened like a model folder: adapter_config.json is parsed and validated by peft's own
`LoraConfig`, and the weights file contributes only its safetensors header, so planning reads no
weights (but for LoRA biases, see `check_biases`). Each adapted module becomes a `LoraModule`
that tells the planner which base tensor it changes and by how much (rank, scale, DoRA magnitude). The merge itself is `merge_lora`, the one
place where the math lives, computed in float32 as peft's `merge_and_unload()` computes it.

Only what merges into a plain weight is accepted. Variants whose merged weight depends on more than
W, A, B and a magnitude (aLoRA, VeLoRA, Arrow, ...) or whose adapter is relative to a changed base
(PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA initialisation) are refused by name rather than merged wrongly.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import torch

from mergekit_mode.errors import ModeError
from mergekit_mode.inputs import TensorInfo, TensorReader, read_json, read_safetensors_header

if TYPE_CHECKING:  # peft is imported where adapters are opened: it costs seconds at start-up
    from peft import LoraConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# peft saves keys of the PeftModel: "base_model.model." + the module's name in the base model.
KEY_PREFIX = "base_model.model."

# LoraConfig options whose adapters do not merge into W + s*BA (or DoRA's rescaling of it).
_UNMERGEABLE_OPTIONS = (
    "alora_invocation_tokens", "arrow_config", "velora_config", "monteclora_config", "kasa_config",
    "use_bdlora", "use_qalora", "target_parameters", "layer_replication", "trainable_token_indices",
)
# init_lora_weights values that subtract the initial adapter from the base weights: the saved
# adapter is relative to weights the recipe's base does not have.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

# Tensor suffixes peft writes per adapted module: (A, B) for Linear and for Embedding layers.
_LINEAR = (".lora_A.weight", ".lora_B.weight")
_EMBEDDING = (".lora_embedding_A", ".lora_embedding_B")
_MAGNITUDE = ".lora_magnitude_vector"
_BIAS = ".lora_B.bias"
# peft saves the base embedding next to an embedding LoRA (save_embedding_layers); it is the base's.
_SAVED_BASE_LAYER = ".base_layer.weight"


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of the base: which base tensor it changes and how."""

    weight: str  # the base tensor it changes, e.g. model.layers.0.mlp.gate_proj.weight
    lora_A: TensorInfo
    lora_B: TensorInfo
    magnitude: TensorInfo | None  # DoRA
    bias: TensorInfo | None  # lora_bias=True: a bias on B, which is not merged (see check_biases)
    r: int
    alpha: float
    scale: float
    transpose: bool  # embedding layers: peft merges (B @ A).T

    def expected_weight_shape(self) -> tuple[int, int]:
        """The base weight shape A and B fit: [out, in], or [vocab, hidden] for embeddings."""
        shape = (self.lora_B.shape[0], self.lora_A.shape[1])
        return shape[::-1] if self.transpose else shape


@dataclass(frozen=True)
class AdapterFolder:
    """A peft LoRA adapter folder: its validated config and, per base tensor, what it changes."""

    path: Path
    config: LoraConfig
    tensors: dict[str, TensorInfo]  # the weights file's header, by the adapter's own keys
    modules: dict[str, LoraModule]  # by the base tensor they change
    saved: dict[str, TensorInfo]  # modules_to_save: base tensor name -> its full replacement

    @classmethod
    def open(cls, path: Path, field: str) -> "AdapterFolder":
        """Parse and check the adapter on its own (the base is checked by the planner)."""
        if not path.is_dir():
            raise ModeError(f"{field}: folder {path} does not exist")
        config = _read_config(path / CONFIG_FILE, field)
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            if (path / "adapter_model.bin").is_file():
                raise ModeError(
                    f"{field}: {path / 'adapter_model.bin'} is a pickle (.bin); pickles can run arbitrary code and "
                    "are not read. Save the adapter with safe_serialization=True (peft's default)"
                )
            raise ModeError(f"{field}: {path} has no {WEIGHTS_FILE}")
        tensors = read_safetensors_header(weights)
        modules, saved = _parse_tensors(tensors, config, f"{field}: {weights}")
        return cls(path, config, tensors, modules, saved)

    @property
    def rslora(self) -> bool:
        return bool(self.config.use_rslora)

    @property
    def dora(self) -> bool:
        return bool(self.config.use_dora)


def _read_config(file: Path, field: str) -> LoraConfig:
    import peft
    from peft import LoraConfig

    raw = read_json(file, field)
    peft_type = str(raw.get("peft_type", ""))
    if peft_type != "LORA":
        raise ModeError(f"{field}: {file}: peft_type {peft_type!r} is not supported; only LoRA adapters (LORA) merge "
                        "into weights")
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(k for k, v in raw.items() if k not in known and v)
    if unknown:  # a newer peft's option; it may change the merge, so do not guess
        raise ModeError(f"{field}: {file}: {unknown[0]} is not an option of the installed peft {peft.__version__}; "
                        "upgrade peft (and mergekit-mode) to merge this adapter")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns about options irrelevant to merging
            config = LoraConfig.from_pretrained(str(file.parent))
    except (TypeError, ValueError) as e:
        raise ModeError(f"{field}: {file}: not a valid LoRA config ({e})") from None
    _check_numbers(config, f"{field}: {file}")
    for option in _UNMERGEABLE_OPTIONS:
        if getattr(config, option, None):
            raise ModeError(f"{field}: {file}: {option} is set; such adapters do not merge into plain weights")
    init = str(config.init_lora_weights).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise ModeError(f"{field}: {file}: init_lora_weights {config.init_lora_weights!r} changes the base weights; "
                        "convert the adapter first (save_pretrained(path_initial_model_for_weight_conversion=...))")
    return config


def _check_numbers(config: LoraConfig, where: str) -> None:
    """peft's config accepts any JSON value for r and alpha; the merge needs numbers."""
    ranks = [("r", config.r)] + [(f"rank_pattern[{k!r}]", v) for k, v in config.rank_pattern.items()]
    alphas = [("lora_alpha", config.lora_alpha)] + [(f"alpha_pattern[{k!r}]", v) for k, v in config.alpha_pattern.items()]
    for key, value in ranks:
        if type(value) is not int or value <= 0:
            raise ModeError(f"{where}: {key} must be a positive integer, not {value!r}")
    for key, value in alphas:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ModeError(f"{where}: {key} must be a number, not {value!r}")


def _rank_and_alpha(config: LoraConfig, module: str) -> tuple[int, float]:
    """r and alpha of one module, with peft's own pattern matching (LoraModel._create_and_replace)."""
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return int(r), float(alpha)


def _parse_tensors(
    tensors: dict[str, TensorInfo], config: LoraConfig, where: str
) -> tuple[dict[str, LoraModule], dict[str, TensorInfo]]:
    """Group the weights file's tensors into adapted modules and saved modules; refuse the rest."""
    modules: dict[str, LoraModule] = {}
    saved: dict[str, TensorInfo] = {}
    claimed: set[str] = set()
    for key in tensors:
        for a_suffix, b_suffix in (_LINEAR, _EMBEDDING):
            if key.endswith(a_suffix):
                module = key.removeprefix(KEY_PREFIX).removesuffix(a_suffix)
                stem = key.removesuffix(a_suffix)
                _check_targeted(config, module, a_suffix == _LINEAR[0], where)
                lora = _lora_module(tensors, config, module, stem, (a_suffix, b_suffix), where)
                modules[lora.weight] = lora
                claimed.update(stem + s for s in (a_suffix, b_suffix, _MAGNITUDE, _BIAS, _SAVED_BASE_LAYER))
    to_save = set(config.modules_to_save or ())
    for key, info in tensors.items():
        if key in claimed:
            continue
        name = key.removeprefix(KEY_PREFIX)
        if _saved_by(name, to_save):
            saved[name] = info
            continue
        raise ModeError(f"{where}: tensor {key!r} is not a LoRA A/B/magnitude tensor nor a module in modules_to_save")
    if not modules and not saved:
        raise ModeError(f"{where}: holds no LoRA tensors")
    return modules, saved


def _check_targeted(config: LoraConfig, module: str, linear: bool, where: str) -> None:
    """A LoRA module must be one that target_modules selects (peft's own matching): peft would not
    load the tensors of any other, so merging them would disagree with peft's merge."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND

    if config.target_modules == INCLUDE_LINEAR_LAYERS_SHORTHAND:
        targeted = linear and not module.endswith("lm_head")  # peft's all-linear: every Linear but the output layer
    else:
        targeted = bool(check_target_module_exists(config, module))
    if not targeted:
        raise ModeError(f"{where}: has LoRA tensors for {module}, which target_modules {config.target_modules!r} "
                        "(less exclude_modules and modules_to_save) does not select; peft would not load them")


def _saved_by(name: str, to_save: set[str]) -> bool:
    """Whether tensor `name` belongs to a module in modules_to_save: peft saves a module whose name
    ends with an entry, with everything below it."""
    parts = name.split(".")[:-1]
    return any(".".join(parts[:j]).endswith(entry) for j in range(1, len(parts) + 1) for entry in to_save)


def _lora_module(
    tensors: dict[str, TensorInfo], config: LoraConfig, module: str, stem: str, suffixes: tuple[str, str], where: str
) -> LoraModule:
    a_suffix, b_suffix = suffixes
    lora_A = tensors[stem + a_suffix]
    lora_B = tensors.get(stem + b_suffix)
    if lora_B is None:
        raise ModeError(f"{where}: has {stem + a_suffix} but not its {b_suffix.lstrip('.')}")
    magnitude = tensors.get(stem + _MAGNITUDE)
    for info in (lora_A, lora_B, magnitude):
        if info is not None and not info.dtype.is_floating_point:
            raise ModeError(f"{where}: tensor {info.name} is {info.dtype}, not a float")
    r, alpha = _rank_and_alpha(config, module)
    transpose = suffixes == _EMBEDDING
    if len(lora_A.shape) != 2 or len(lora_B.shape) != 2 or (lora_A.shape[0], lora_B.shape[1]) != (r, r):
        raise ModeError(f"{where}: {module}: A {list(lora_A.shape)} and B {list(lora_B.shape)} do not have rank r={r} "
                        "(from r / rank_pattern in adapter_config.json)")
    out_dim = lora_B.shape[0]  # DoRA's norms: one per output row, or per embedding column
    if config.use_dora != (magnitude is not None):
        raise ModeError(f"{where}: {module}: use_dora is {config.use_dora} but the magnitude vector is "
                        f"{'missing' if magnitude is None else 'present'}")
    if magnitude is not None and magnitude.shape != (out_dim,):
        raise ModeError(f"{where}: {module}: DoRA magnitude has shape {list(magnitude.shape)}, expected [{out_dim}]")
    scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return LoraModule(module + ".weight", lora_A, lora_B, magnitude, tensors.get(stem + _BIAS), r, alpha, scale,
                      transpose)


def check_biases(adapter: AdapterFolder, reader: TensorReader, field: str) -> None:
    """Refuse non-zero lora_B biases: they are not merged (most adapted layers have no bias to add
    them to in any output format). Zero ones change nothing.

    The one place planning reads weights: a bias is one vector per module, and a recipe that cannot
    be built should fail in `validate`, not halfway through a build."""
    for lora in adapter.modules.values():
        if lora.bias is not None and bool(reader.read(lora.bias).any()):
            raise ModeError(f"{field}: {lora.bias.file}: {lora.bias.name} is a non-zero LoRA bias (lora_bias=True) on "
                            f"{lora.weight}; LoRA biases are not merged")


def merge_lora(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    transpose: bool,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """The merged weight in float32, as peft's merge_and_unload computes it.

    LoRA: W + (B @ A) * scale, with B @ A transposed for embedding layers (fan_in_fan_out).
    DoRA: m / ||W + delta|| * (W + delta), the norm over each output row (each embedding column),
    taken against the exact base W, as peft's DoraLinearVariant/DoraEmbeddingVariant merge.
    """
    a, b = lora_A.float(), lora_B.float()
    # one fused BLAS call, W + scale * (B @ A), into a new tensor (the caller's W stays intact);
    # (B @ A).T is A.T @ B.T
    merged = torch.addmm(weight.float(), *((a.T, b.T) if transpose else (b, a)), alpha=scale)
    if magnitude is None:
        return merged
    norm = torch.linalg.norm(merged.T if transpose else merged, dim=1)
    factor = magnitude.float() / norm
    return merged.mul_(factor.view(1, -1) if transpose else factor.view(-1, 1))


def recorded_base_differs(adapter: AdapterFolder, base: Path) -> str | None:
    """The base the adapter says it was trained on, when that does not look like `base`.

    peft records whatever path or hub id the base was loaded from; a match is the same folder or
    the same last path component (a hub id 'org/name' against a local folder 'name')."""
    recorded = adapter.config.base_model_name_or_path
    if not recorded:
        return None
    if Path(recorded).name == base.resolve().name or Path(recorded).resolve() == base.resolve():
        return None
    return recorded
