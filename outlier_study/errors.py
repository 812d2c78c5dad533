"""One error type for bad user input, so the CLI can print one line and exit non-zero."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """Bad input, named by its config field; the CLI prints it as one line."""

    def __init__(self, field: str, message: str, allowed: Iterable[object] | None = None) -> None:
        self.field = field
        text = f"{field}: {message}"
        if allowed is not None:
            text += f" (allowed: {', '.join(str(a) for a in allowed)})"
        super().__init__(text)


def require(condition: bool, field: str, message: str, allowed: Iterable[object] | None = None) -> None:
    """Raise ConfigError unless condition holds."""
    if not condition:
        raise ConfigError(field, message, allowed)
