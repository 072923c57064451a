"""The recipe: pydantic models of `recipe.yml`, and loading with errors that name the field.

Pure validation: nothing here opens a model. Paths stay as written (relative to the recipe's
folder) so the model card and the copied recipe read the same on every machine; `resolve` gives
the absolute path when a folder must be opened.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from mergekit_mode.errors import ModeError
from mergekit_mode.formats import NAMES as FORMAT_NAMES, defaults as format_defaults
from mergekit_mode.safety import name_too_long, read_small_file

_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "T": 10**12, "TB": 10**12, "TIB": 2**40}


def parse_size(value: object) -> int:
    """'2GB', '500M', '1GiB' or a byte count -> bytes (decimal units, as mergekit and HF read them)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"not a size: {value!r} (use e.g. 2GB, 500MB, 1GiB or a byte count)")
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


ByteSize = Annotated[int, BeforeValidator(parse_size)]
DType = Literal["float32", "float16", "bfloat16"]


def _not_bool(value: object) -> object:
    """YAML's true/false are not numbers (pydantic would read `experts_per_token: true` as 1)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


def _name_lengths(path: Path) -> Path:
    problem = name_too_long(path)
    if problem:
        raise ValueError(problem)
    return path


def _seed_range(seed: int) -> int:
    if not -2**63 <= seed < 2**64:
        raise ValueError(f"{seed} is out of range: a seed is a 64-bit integer (-2**63 to 2**64-1, what torch's "
                         "generator takes)")
    return seed


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
Seed = Annotated[int, BeforeValidator(_not_bool), AfterValidator(_seed_range)]
FilePath = Annotated[Path, AfterValidator(_name_lengths)]
# Router training holds a step's tokens (batch_size x seq_len) and their activations in memory.
MAX_TOKENS_PER_STEP = 2**20


RESERVED_NAME = "base_model"  # how plans and `stem:` refer to the recipe's base


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpertData(_Strict):
    """Text of an expert's domain, read by the routers made from data (router.mode hidden or trained)."""

    data: Optional[FilePath] = Field(
        None, description="Text of the expert's domain: plain text (one document per line) or .jsonl with a "
        "'text' field per record. Read lazily from the start, up to max_tokens tokens.",
    )
    prompts: Optional[list[str]] = Field(
        None, min_length=1, description="Example texts of the domain (each one document).",
    )
    negative_prompts: Optional[list[str]] = Field(
        None, min_length=1,
        description="hidden: texts this expert should not get; their mean is subtracted from its row.",
    )
    max_tokens: Optional[Int] = Field(
        None, ge=1, description="Most tokens taken from prompts and data; default: router.max_tokens.",
    )

    @property
    def has_data(self) -> bool:
        return self.data is not None or self.prompts is not None


class ExpertSpec(ExpertData):
    """One expert: a full fine-tune of the base, a LoRA adapter of it, or an adapter of a fine-tune."""

    name: Optional[str] = Field(
        None, description="Unique name; default: the model folder's name, or the adapter folder's without a model."
    )
    model: Optional[FilePath] = Field(None, description="Folder of a fine-tune of base_model (same architecture and shapes).")
    adapter: Optional[FilePath] = Field(
        None, description="Folder of a peft LoRA adapter (adapter_config.json + adapter_model.safetensors), "
        "merged into `model` when given, else into base_model.",
    )

    @model_validator(mode="after")
    def _model_or_adapter(self) -> "ExpertSpec":
        if self.model is None and self.adapter is None:
            raise ValueError("give model:, adapter: or both")
        return self

    @property
    def display_name(self) -> str:
        return self.name or Path(self.model or self.adapter).name


class FromExpert(_Strict):
    """Take these tensors from one expert (its fine-tune's, or the base's with its adapter merged)."""

    from_: str = Field(alias="from", description="The expert's name.")


def _policy(choices: tuple[str, ...]):
    """A policy is one of `choices` or {from: <expert>}; one clear message instead of pydantic's
    per-union-member errors."""

    def check(value: object) -> object:
        if value in choices or isinstance(value, FromExpert):
            return value
        if isinstance(value, dict) and set(value) == {"from"} and isinstance(value["from"], str):
            return FromExpert.model_validate(value)
        raise ValueError(f"use {' or '.join(choices)} or {{from: <expert name>}}, not {value!r}")

    return BeforeValidator(check)


SharedDeltas = Annotated[Union[Literal["average", "drop"], FromExpert], _policy(("average", "drop"))]
BaseOrExpert = Annotated[Union[Literal["base"], FromExpert], _policy(("base",))]
Embeddings = BaseOrExpert
SharedExpertPolicy = Annotated[Union[Literal["none", "base"], FromExpert], _policy(("none", "base"))]


DATA_MODES = ("hidden", "trained")


class TrainSpec(_Strict):
    """router.train: training only the router weights on the experts' data (everything else frozen)."""

    objective: Literal["domain", "lm"] = Field(
        "domain", description="domain: each layer's router learns to pick the expert whose data a token came from "
        "(cross-entropy on that layer's router inputs, layer by layer; cheap). lm: next-token loss of the MoE "
        "plus the output format's load-balancing loss, run and back-propagated one layer at a time (memory: one layer).",
    )
    init: Literal["hidden", "zeros", "domain"] = Field(
        "hidden", description="Start from the hidden-mode routers, from zeros, or (objective lm) from routers first "
        "trained with objective domain from the hidden ones (a domain-classifier init).",
    )
    steps: Int = Field(300, ge=1, description="Optimizer steps (per layer for objective domain).")
    lr: Float = Field(3e-3, gt=0, description="Adam learning rate (at most 1).")
    batch_size: Int = Field(8, ge=1, description="Sequences of seq_len tokens per step (batch_size x seq_len at "
                            f"most {MAX_TOKENS_PER_STEP}).")
    held_out: Float = Field(0.1, ge=0, lt=1, description="Share of each expert's documents kept out of training "
                            "and used to report routing accuracy per layer.")

    @model_validator(mode="after")
    def _domain_init_for_lm(self) -> "TrainSpec":
        if self.lr > 1:
            raise _FieldError("lr", f"{self.lr} is too large: Adam moves each router weight by about lr per step "
                              "and router weights are of order 1, so anything above 1 diverges (default 3e-3)")
        if self.init == "domain" and self.objective != "lm":
            raise ValueError("init domain applies to objective lm (objective domain starts from hidden or zeros)")
        return self


class RouterSpec(_Strict):
    """How each layer's router (one row per expert) is made."""

    mode: Literal["gateless", "noisy", "random", "hidden", "trained"] = Field(
        "gateless",
        description="gateless: zero router, every expert on every token with weight 1/E. "
        "noisy: normal(0, std) router with top-k. random: standard normal router (mergekit's 'random'). "
        "hidden: rows are the base's pooled router inputs on each expert's data (mergekit's hidden / hidden_avg, "
        "taken at the real router input). trained: rows trained on the experts' data (router.train).",
    )
    experts_per_token: Optional[Int] = Field(
        None, ge=1, description="top-k for noisy/random (default 2); gateless always uses all experts."
    )
    std: Optional[Float] = Field(None, gt=0, description="noisy: standard deviation; default: the base's initializer_range.")
    seed: Seed = Field(0, description="Seed of the random routers; same recipe and seed give identical files.")
    pooling: Optional[Literal["last", "mean"]] = Field(
        None, description="hidden: pool each document's router inputs by its last token (mergekit's hidden) or "
        "their mean (mergekit's hidden_avg); default last. trained with init hidden: the init's pooling.",
    )
    max_tokens: Int = Field(
        20_000, ge=1, description="hidden/trained: most tokens taken from each expert's prompts and data "
        "(per-expert max_tokens overrides).",
    )
    seq_len: Int = Field(
        128, ge=2, description="hidden/trained: documents longer than this are cut into pieces of this many tokens.",
    )
    train: Optional[TrainSpec] = Field(None, description="trained: how the routers are trained (defaults if omitted).")

    @model_validator(mode="after")
    def _std_only_for_noisy(self) -> "RouterSpec":
        if self.std is not None and self.mode != "noisy":
            raise ValueError(f"std applies to mode 'noisy' only, not {self.mode!r}")
        if self.pooling is not None and self.mode not in DATA_MODES:
            raise ValueError(f"pooling applies to modes {', '.join(DATA_MODES)}, not {self.mode!r}")
        if self.train is not None and self.mode != "trained":
            raise ValueError(f"train applies to mode 'trained' only, not {self.mode!r}")
        tokens = self.training.batch_size * self.seq_len
        if self.mode == "trained" and tokens > MAX_TOKENS_PER_STEP:
            raise _FieldError("train.batch_size", f"{self.training.batch_size} sequences of seq_len {self.seq_len} "
                              f"tokens are {tokens} tokens per step; at most {MAX_TOKENS_PER_STEP} (a step holds them "
                              "and their activations in memory)")
        return self

    @property
    def training(self) -> TrainSpec:
        return self.train or TrainSpec()


def _stem_model(value: object) -> object:
    """`- code` is short for `- model: code` (mergekit spells out the mapping)."""
    return {"model": value} if isinstance(value, str) else value


class StemModel(_Strict):
    """One input of the stem merge, as in mergekit's `models:` list."""

    model: str = Field(description="An expert's name, or `base_model` for the recipe's base.")
    parameters: dict[str, Any] = Field({}, description="This input's values of the method's per-model parameters.")


class StemSpec(_Strict):
    """The shared tensors (attention, norms, embeddings, lm_head) merged by a mergekit merge method.

    Mirrors a mergekit config: `merge_method`, `base_model`, `parameters`, `models`. Names, not
    paths: models are the recipe's experts (and `base_model`). Checked against the installed
    mergekit's registry by `mergekit_mode.stem`, not here, so parsing a recipe stays light.
    """

    merge_method: str = Field(description="A method of mergekit's registry: linear, ties, dare_ties, slerp, ...")
    base_model: Optional[str] = Field(
        None, description="`base_model` (the recipe's base) or an expert's name; default: base_model for "
        "methods that need a base, none otherwise.")
    parameters: dict[str, Any] = Field({}, description="The method's parameters, defaults for every model.")
    models: Optional[list[Annotated[StemModel, BeforeValidator(_stem_model)]]] = Field(
        None, description="The merged models, in order; default: every expert.")
    seed: Seed = Field(0, description="Seed of randomized methods (dare_*, della): same recipe, same bytes.")


def _stem_base(value: object) -> object:
    """`stem: base` (copy the base's tensors, the default) is stored as None."""
    if value == "base":
        return None
    if isinstance(value, str):
        raise ValueError(f"{value!r}: use `base` or a mapping with merge_method (a mergekit merge)")
    return value


def _stem_schema(schema: dict) -> None:
    """The JSON Schema says `base`, what users write, not the None it is stored as."""
    schema["anyOf"] = [{"const": "base"} if branch == {"type": "null"} else branch for branch in schema["anyOf"]]
    schema["default"] = "base"


class OutputSpec(_Strict):
    architecture: Optional[Literal[FORMAT_NAMES]] = Field(
        None, description=f"The output format (its model_type); default: the base family's ({format_defaults()}). "
        "`mergekit-mode validate` names the one chosen.")
    shard_size: ByteSize = Field(parse_size("2GB"), description="Largest safetensors shard, e.g. 2GB or 500MB.")


def _check_list(value: object) -> object:
    """`checks:` may be one mapping (one check) or a list of them."""
    return [value] if isinstance(value, dict) else value


class CheckSpec(_Strict):
    """A quality gate the build runs on the finished model before it is renamed into place."""

    against: Literal["experts", "base"] = Field(
        "experts", description="experts: each domain against the expert of the same name (adapters merged in "
        "memory); base: every domain against the base model.")
    max_ratio: float = Field(gt=0, description="A domain fails when its perplexity is above max_ratio times the "
                             "reference's.")
    data: dict[str, Path] = Field(min_length=1, description="Held-out text per domain, NAME: FILE (plain text, one "
                                  "document per line, or .jsonl with 'text'); with against: experts, NAME is an "
                                  "expert's name.")
    ctx: int = Field(128, ge=2, description="Window length in tokens (as for `mergekit-mode eval`).")
    max_tokens: int = Field(50_000, ge=1, description="Tokens read from the start of each file.")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass.")


class Recipe(_Strict):
    """A Mixture-of-Domain-Experts recipe."""

    merge_method: Literal["mode"] = "mode"
    base_model: FilePath = Field(description="Model folder that gives attention, embeddings, norms, lm_head and tokenizer.")
    dtype: Optional[DType] = Field(None, description="Output dtype; default: the base's.")
    experts: list[ExpertSpec] = Field(min_length=2, description="Two or more experts; each brings its MLP.")
    router: RouterSpec = RouterSpec()
    stem: Annotated[Optional[StemSpec], BeforeValidator(_stem_base)] = Field(
        None, description="`base` (default): shared tensors are the base's. A mapping: merged by a mergekit method.",
        json_schema_extra=_stem_schema)
    output: OutputSpec = OutputSpec()
    shared_deltas: SharedDeltas = Field(
        "average",
        description="With stem: base, what adapters' changes outside the MLP (attention, norms) become, as "
        "the output's experts share them: "
        "average: the base plus the mean of the adapter experts' changes (an adapter that leaves a tensor alone "
        "counts as a zero change; full fine-tunes give only their MLP); drop: the base's; "
        "{from: <expert>}: that expert's tensors.",
    )
    chat_template: BaseOrExpert = Field(
        "base", description="Which folder's tokenizer settings the output carries: chat template, eos/pad tokens "
        "(tokenizer_config.json, special_tokens_map.json, chat_template.jinja/.json): base or {from: <expert>}. "
        "Vocabularies must be equal anyway (checked).")
    generation_config: BaseOrExpert = Field(
        "base", description="Which folder's generation_config.json the output carries: base or {from: <expert>}.")
    checks: Annotated[list[CheckSpec], BeforeValidator(_check_list)] = Field(
        [], description="Quality gates run after writing and before the output is renamed into place: a failed "
        "check leaves no output (build --keep-failed keeps it).")
    embeddings: Optional[Embeddings] = Field(
        None,
        description="With stem: base, needed when an adapter changes embed_tokens or lm_head (LoRA target or "
        "modules_to_save), which the experts share: base: keep the base's; {from: <expert>}: that expert's.",
    )
    shared_expert: Optional[SharedExpertPolicy] = Field(
        None,
        description="Formats with a shared expert (qwen2_moe), which adds sigmoid(gate . x) * shared_mlp(x) to the "
        "routed experts on every token: none (default): an all-zero shared MLP, so the block is the routed mixture; "
        "base: the base's MLP; {from: <expert>}: that expert's MLP. Its gate starts near 0 (weight about 0.5) and "
        "router.train objective lm learns it.",
    )

    @model_validator(mode="after")
    def _names_unique_and_k_fits(self) -> "Recipe":
        seen: dict[str, int] = {}
        for i, expert in enumerate(self.experts):
            name = expert.display_name
            if name == RESERVED_NAME:
                raise _FieldError(f"experts[{i}].name", f"{name!r} names the recipe's base model; rename the expert")
            if name in seen:
                raise _FieldError(f"experts[{i}].name", f"{name!r} is already the name of experts[{seen[name]}]; "
                                  "names must be unique (set name:)")
            seen[name] = i
        if self.router.mode in DATA_MODES:
            for i, expert in enumerate(self.experts):
                if not expert.has_data:
                    raise _FieldError(f"experts[{i}]", f"router.mode {self.router.mode} needs data: or prompts: "
                                      "on every expert")
        policies = (("shared_deltas", self.shared_deltas), ("embeddings", self.embeddings),
                    ("shared_expert", self.shared_expert))
        for key, policy in policies:
            if self.stem is not None and key in self.model_fields_set and key != "shared_expert":
                raise _FieldError(key, "applies with `stem: base` only; a stem merge takes each adapter expert's "
                                  "merged weights as that model's")
            if isinstance(policy, FromExpert) and policy.from_ not in seen:
                raise _FieldError(f"{key}.from", f"{policy.from_!r} is not the name of an expert ({', '.join(seen)})")
        for key in ("chat_template", "generation_config"):
            policy = getattr(self, key)
            if isinstance(policy, FromExpert) and policy.from_ not in seen:
                raise _FieldError(f"{key}.from", f"{policy.from_!r} is not the name of an expert ({', '.join(seen)})")
        for i, check in enumerate(self.checks):
            if check.against == "experts":
                for name in check.data:
                    if name not in seen:
                        raise _FieldError(f"checks[{i}].data.{name}", f"with against: experts, a domain is named "
                                          f"after its expert ({', '.join(seen)})")
        k = self.router.experts_per_token
        if k is not None and k > len(self.experts):
            raise _FieldError("router.experts_per_token", f"{k} is more than the {len(self.experts)} experts")
        return self

    @property
    def expert_names(self) -> list[str]:
        return [e.display_name for e in self.experts]

    @property
    def top_k(self) -> int:
        """num_experts_per_tok of the output: all experts for gateless (equal weights), else k."""
        if self.router.mode == "gateless":
            return len(self.experts)
        return self.router.experts_per_token or 2


class _FieldError(ValueError):
    """A cross-field check that knows which field it is about (pydantic would blame the whole object)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class LoadedRecipe(BaseModel):
    """A validated recipe with where it came from: relative paths resolve against its folder."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    recipe: Recipe
    path: Path
    text: str

    def resolve(self, p: Path) -> Path:
        return p if p.is_absolute() else (self.path.parent / p)


def format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_recipe(data: object, source: str) -> Recipe:
    """Validate recipe data; the first problem becomes a ModeError 'source: field: message'."""
    if not isinstance(data, dict):
        raise ModeError(f"{source}: a recipe is a YAML mapping (merge_method, base_model, experts, ...)")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        ctx_err = (first.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _FieldError):  # its field is relative to the model that raised it
            field = ".".join(filter(None, (format_loc(first["loc"]), ctx_err.field)))
            raise ModeError(f"{source}: {field}: {ctx_err.message}") from None
        loc = format_loc(first["loc"]) or "recipe"
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; `mergekit-mode schema` lists the keys)"
        elif first["type"] == "path_type":
            msg = f"expected a folder path, got {first['input']!r}"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ModeError(f"{source}: {loc}: {msg}{more}") from None


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: the plain
    loader keeps the last, so `base_model: base` then `base_model: e1` would build from e1."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may override, by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = lines.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise _DuplicateKey(f"key {key!r} is given twice (lines {first} and {key_node.start_mark.line + 1}); "
                                    "give it once")
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str) -> object:
    """YAML data from recipe text; duplicate keys and syntax errors become one line naming `source`."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise ModeError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ModeError(f"{source}: not valid YAML{line}: {getattr(e, 'problem', e)}") from None


def load_recipe(path: Path) -> LoadedRecipe:
    try:
        text = read_small_file(path).decode("utf-8")
    except FileNotFoundError:
        raise ModeError(f"{path}: recipe file does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModeError(f"{path}: cannot read recipe ({e})") from None
    return LoadedRecipe(recipe=parse_recipe(load_yaml(text, str(path)), str(path)), path=path, text=text)


def json_schema() -> dict:
    return Recipe.model_json_schema()
