"""What each router mode is and which settings it takes: the one table that the recipe, sweep and
the model card read (no torch here; each mode's algorithm lives in routers.py and its own modules).

A mode is declared once: its name, whether it needs the experts' text, how the recipe's schema and
the model card describe it, and which `router:` settings apply to it (sweep keeps a recipe's
settings for the modes they apply to and drops them for the others). `router.train` and the
defaults of the fits are here too, because the same table decides them for recipe and card.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergekit_mode.fields import FieldError, Float, Int


@dataclass(frozen=True)
class RouterMode:
    name: str
    needs_data: bool
    schema: str  # the recipe schema's description of the mode
    card: str  # the model card's sentence about the mode


MODES: dict[str, RouterMode] = {m.name: m for m in (
    RouterMode("gateless", False, "zero router, every expert on every token with weight 1/E",
               "gate-less: every expert runs on every token with equal weight 1/E (router weights are zero)"),
    RouterMode("noisy", False, "normal(0, std) router with top-k",
               "noisy: Gaussian router weights, top-k experts per token"),
    RouterMode("random", False, "standard normal router (mergekit's 'random')",
               "random: standard-normal router weights (mergekit-moe's `random`), top-k experts per token"),
    RouterMode("hidden", True, "rows are the base's pooled router inputs on each expert's data (mergekit's hidden "
               "/ hidden_avg, taken at the real router input)",
               "hidden: each row is the base's pooled router input (post_attention_layernorm output) on that "
               "expert's data, L2-normalised (mergekit's hidden / hidden_avg at the real router input), "
               "top-k experts per token"),
    RouterMode("trained", True, "rows trained on the experts' data (router.train)",
               "trained: router weights trained on the experts' data with everything else frozen (see router.train "
               "in the recipe), top-k experts per token"),
)}
MODE_NAMES: tuple[str, ...] = tuple(MODES)
DATA_MODES: tuple[str, ...] = tuple(m.name for m in MODES.values() if m.needs_data)
ModeName = Literal[MODE_NAMES]  # type: ignore[valid-type]

# router settings -> the modes they apply to; `seed` applies to all.
APPLIES: dict[str, tuple[str, ...]] = {
    "experts_per_token": tuple(m for m in MODE_NAMES if m != "gateless"),
    "std": ("noisy",),
    "pooling": DATA_MODES,
    "max_tokens": DATA_MODES,
    "seq_len": DATA_MODES,
    "train": ("trained",),
}


def mode_help() -> str:
    return " ".join(f"{m.name}: {m.schema}." for m in MODES.values())


@dataclass(frozen=True)
class Fit:
    """Adam steps and learning rate of one training objective."""

    steps: int
    lr: float


# Chosen on the development fixture of benchmarks/bench_quality.py (docs/quality.md): fitted to
# convergence, the domain classifier keeps every development domain within 5% of its expert (300
# steps at 3e-3 left the deeper layers' routers unsure and cost up to 9%). lm steps run the whole MoE.
FIT_DEFAULTS: dict[str, Fit] = {"domain": Fit(steps=3000, lr=1e-2), "lm": Fit(steps=300, lr=3e-3)}
Objective = Literal["domain", "lm"]
# Early stopping of objective lm (check_every 10 steps, then these): patience 1-6, check_every
# 10-30 and MIN_GAIN 0-5e-3 replayed on the checks that benchmarks/bench_lm_steps.py recorded, three
# seeds of each synthetic fixture of bench_quality (docs/benchmarks.md "Fewer lm steps"); the shortest
# that kept markov-sharp, where lm gains most, at the perplexities of all 300 steps. A gain under
# MIN_GAIN nats of held-out loss (0.1% of perplexity) is step-to-step noise.
PATIENCE = 3
MIN_GAIN = 1e-3
# Router training holds a step's tokens (batch_size x seq_len) and their activations in memory.
MAX_TOKENS_PER_STEP = 2**20


class TrainSpec(BaseModel):
    """router.train: training only the router weights on the experts' data (everything else frozen)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    objective: Objective = Field(
        "domain", description="domain: each layer's router learns to pick the expert whose data a token came from "
        "(cross-entropy on that layer's router inputs, layer by layer; cheap). lm: next-token loss of the MoE "
        "plus the output format's load-balancing loss, run and back-propagated one layer at a time (memory: one layer).",
    )
    init: Literal["hidden", "zeros", "domain"] = Field(
        "hidden", description="Start from the hidden-mode routers, from zeros, or (objective lm) from routers first "
        "trained with objective domain from the hidden ones (a domain-classifier init, with domain's default steps "
        "and lr).",
    )
    steps: Optional[Int] = Field(
        None, ge=1, description=f"Optimizer steps of the objective (per layer for domain); default "
        f"{FIT_DEFAULTS['domain'].steps} for domain, {FIT_DEFAULTS['lm'].steps} for lm.")
    lr: Optional[Float] = Field(
        None, gt=0, description=f"Adam learning rate (at most 1); default {FIT_DEFAULTS['domain'].lr:g} for domain, "
        f"{FIT_DEFAULTS['lm'].lr:g} for lm.")
    batch_size: Int = Field(8, ge=1, description="Sequences of seq_len tokens per step (batch_size x seq_len at "
                            f"most {MAX_TOKENS_PER_STEP}).")
    held_out: Float = Field(0.1, ge=0, lt=1, description="Share of each expert's documents kept out of training, "
                            "used to report routing accuracy per layer and (objective lm) to stop early.")
    check_every: Int = Field(10, ge=1, description="Objective lm: steps between checks of the MoE's loss on the "
                             "held-out documents (a check is one forward pass over them).")
    patience: Int = Field(PATIENCE, ge=0, description="Objective lm: training stops early when this many checks in a "
                          f"row have not lowered the held-out perplexity by {MIN_GAIN:.1%} (from the last check that "
                          "did), and keeps the routers "
                          "of the check with the lowest held-out loss; 0 runs every step and keeps the last routers "
                          "(so does held_out 0).")

    @model_validator(mode="after")
    def _domain_init_for_lm(self) -> "TrainSpec":
        if self.lr is not None and self.lr > 1:
            raise FieldError("lr", f"{self.lr} is too large: Adam moves each router weight by about lr per step "
                             f"and router weights are of order 1, so anything above 1 diverges (default "
                             f"{FIT_DEFAULTS[self.objective].lr:g})")
        if self.init == "domain" and self.objective != "lm":
            raise ValueError("init domain applies to objective lm (objective domain starts from hidden or zeros)")
        return self

    def fit(self, objective: Objective) -> Fit:
        """Steps and lr for training with `objective`: the recipe's for its own objective, the defaults
        for the other (the domain init of objective lm)."""
        default = FIT_DEFAULTS[objective]
        if objective != self.objective:
            return default
        return Fit(self.steps or default.steps, self.lr or default.lr)
