"""Field types and the cross-field error shared by the recipe schema and the router mode table
(router_modes.py, which recipe.py imports: they live here so neither imports the other)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator


def not_bool(value: object) -> object:
    """YAML's true/false are not numbers (pydantic would read `experts_per_token: true` as 1)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


Int = Annotated[int, BeforeValidator(not_bool)]
Float = Annotated[float, BeforeValidator(not_bool)]


class FieldError(ValueError):
    """A cross-field check that knows which field it is about (pydantic would blame the whole object)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
