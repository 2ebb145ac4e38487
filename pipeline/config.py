"""Stage configs are frozen dataclasses checked when they are built, not deep inside a stage.

`Validated.__post_init__` checks every `Literal[...]` field against its allowed values and every
number for being finite, then calls the class's own `check()` for ranges; a bad value raises
`PipelineError` with a sentence that names the field as the CLI flag (`batch_size` →
`--batch-size`), so library users and CLI users read the same message.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from pipeline.errors import PipelineError


def flag(name: str) -> str:
    """The CLI flag of a config field."""
    return "--" + name.replace("_", "-")


class Validated:
    """Mixin for frozen dataclass configs: Literal fields are checked, then `check()` runs."""

    def __post_init__(self) -> None:
        check_literals(self)
        check_finite(self)
        self.check()

    def check(self) -> None:
        """Range and consistency checks of the subclass; raise PipelineError with a sentence."""


def check_literals(config: Any) -> None:
    hints = get_type_hints(type(config))
    for f in dataclasses.fields(config):
        allowed = literal_values(hints.get(f.name))
        if allowed is None:
            continue
        value = getattr(config, f.name)
        if value not in allowed:
            shown = ", ".join(str(a) for a in allowed if a is not None)
            raise PipelineError(f"{flag(f.name)} must be one of {shown}, not {value!r}.")


def check_finite(config: Any) -> None:
    """Every number of a config (and of the dataclasses it holds) is finite: NaN compares false with
    every bound, so range checks alone would let `--lr nan` through, and infinity is no setting."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_finite(value)
            continue
        for number in value if isinstance(value, tuple) else (value,):
            if isinstance(number, float) and not math.isfinite(number):
                raise PipelineError(f"{flag(f.name)} must be a finite number, not {number}.")


def literal_values(hint: Any) -> tuple[Any, ...] | None:
    """The values a `Literal[...]` (or `Literal[...] | None`) admits; None for other types."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    if get_origin(hint) in (Union, types.UnionType):
        values: list[Any] = []
        for arg in get_args(hint):
            if arg is type(None):
                values.append(None)
            elif get_origin(arg) is Literal:
                values.extend(get_args(arg))
            else:
                return None
        return tuple(values)
    return None


def at_least(config: Any, name: str, low: float) -> None:
    value = getattr(config, name)
    if value is not None and value < low:
        raise PipelineError(f"{flag(name)} must be at least {low}, not {value}.")


def within(config: Any, name: str, low: float, high: float, *, low_open: bool = False,
           high_open: bool = False) -> None:
    """`low ≤ value ≤ high`, with either end open if asked."""
    value = getattr(config, name)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise PipelineError(f"{flag(name)} must lie in {span}, not {value}.")


def read_toml(path: Path, what: str = "file") -> dict[str, Any]:
    """A TOML file as a dict, or a sentence naming the file and what is wrong with it."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PipelineError(f"Cannot read the {what} {path}: {exc.strerror or exc}.") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"The {what} {path} is not valid TOML: {exc}.") from exc
