"""Output formats: a registry of OutputFormat classes (formats/base.py says what a format is).

A new format is one module with an OutputFormat subclass and one line in FORMATS. The first
format that lists a base family is that family's default (`output.architecture` picks another).
"""

from __future__ import annotations

from typing import Any, Optional

from mergekit_mode.errors import ModeError
from mergekit_mode.formats.base import OutputFormat
from mergekit_mode.formats.families import FAMILIES, BaseFamily
from mergekit_mode.formats.mixtral import Mixtral
from mergekit_mode.formats.qwen2_moe import Qwen2Moe
from mergekit_mode.formats.qwen3_moe import Qwen3Moe

FORMATS: tuple[OutputFormat, ...] = (
    Mixtral(),
    Qwen2Moe(),
    Qwen3Moe(),
)
NAMES: tuple[str, ...] = tuple(f.name for f in FORMATS)


def defaults() -> str:
    """Each base family's default format, for help texts ('family, family: format; ...')."""
    by_format: dict[str, list[str]] = {}
    for family in FAMILIES:
        fits = _formats_for(family)
        if fits:
            by_format.setdefault(fits[0].name, []).append(family.name)
    return "; ".join(f"{', '.join(fams)}: {name}" for name, fams in by_format.items())


def by_name(name: str) -> OutputFormat:
    return next(f for f in FORMATS if f.name == name)


def _formats_for(family: BaseFamily) -> list[OutputFormat]:
    return [f for f in FORMATS if f.takes(family)]


def for_base(family: BaseFamily, requested: Optional[str]) -> OutputFormat:
    """The recipe's output.architecture (or the family's default), refused when it cannot
    express the base: the message says what the base has and which formats take it."""
    fits = _formats_for(family)
    if requested is None:
        if not fits:
            raise ModeError(f"base_model: no output format takes {family.name} bases")
        return fits[0]
    fmt = by_name(requested)
    if not fmt.takes(family):
        takes = ", ".join(fam.name for fam in FAMILIES if fmt.takes(fam))
        other = f"; {family.name} bases go to {' or '.join(f.name for f in fits)}" if fits else ""
        raise ModeError(f"output.architecture: {fmt.name} takes {takes} bases; base_model is a {family.name} "
                        f"model ({family.features}), which {fmt.title} cannot express{other}")
    return fmt


def of_config(config: Any) -> Optional[OutputFormat]:
    """The format a built model's config (a config.json dict or a transformers config) is in, if any."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return next((f for f in FORMATS if f.name == model_type), None)


def output_architectures() -> tuple[str, ...]:
    """Every architecture mergekit-mode writes: what export-gguf agrees to convert."""
    return tuple(f.architecture for f in FORMATS)
