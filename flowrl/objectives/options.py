"""Typed options of the objectives: what a config sets for a loss or an advantage estimator.

Each objective's options are a frozen dataclass defined next to its function
(:class:`~flowrl.objectives.flowrl.FlowRLLossOptions` beside :func:`~flowrl.objectives.flowrl.flowrl_loss`,
...). Its fields are the function's keyword-only options, each with the function's own default (read from
the signature by :func:`option`, so the two cannot drift apart) and a help text. The trainer's config
(``algorithm.loss``, ``algorithm.advantage``), TRL's ``FlowRLConfig`` and verl's ``flowrl`` section all
hold these, so every switch and its default shows in a saved config and in ``--help``.

An :class:`Options` is also a read-only mapping of its fields, so ``fn(**options)`` passes them and
``dict(options)`` lists them.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

_O = TypeVar("_O", bound="Options")


def default_of(fn: Callable[..., Any], argument: str) -> Any:
    """The default of ``fn``'s ``argument``, read from its signature."""
    return inspect.signature(fn).parameters[argument].default


def option(fn: Callable[..., Any], argument: str, help: str) -> Any:
    """A dataclass field for ``fn``'s keyword option ``argument``: its default is ``fn``'s, its help
    ``help``."""
    return dataclasses.field(default=default_of(fn, argument), metadata={"help": help})


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming the choices unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(choices)}")


@dataclasses.dataclass(frozen=True)
class Options(Mapping[str, Any]):
    """Base of the option dataclasses: a read-only mapping of the fields, and their help."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in field order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def default_of(cls, name: str) -> Any:
        """The default of option ``name``."""
        return {f.name: f.default for f in dataclasses.fields(cls)}[name]

    @classmethod
    def help_of(cls, name: str) -> str:
        """The help text of option ``name``."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}[name]

    @classmethod
    def from_mapping(cls: type[_O], values: Mapping[str, Any] | None, where: str) -> _O:
        """The options of ``values`` (the defaults for the keys it lacks).

        Args:
            values: option names to values, e.g. a config section; None: all defaults.
            where: the section's name in errors, e.g. ``"algorithm.loss"``.

        Raises:
            ValueError: a key that is not an option (named with the closest option and all of them), or
                a value the dataclass refuses.
        """
        values = dict(values or {})
        cls.check_keys(values, where)
        return cls(**values)

    @classmethod
    def check_keys(cls, values: Mapping[str, Any], where: str) -> None:
        """Raise a ValueError for the first key of ``values`` that is not an option, naming the closest
        option and all valid ones (``where``: the section's name, e.g. ``"algorithm.loss"``)."""
        names = cls.names()
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                valid = ", ".join(names) if names else "none: it takes no options"
                raise ValueError(f"unknown option {where}.{key}{hint} (valid: {valid})")

    @classmethod
    def describe(cls, prefix: str) -> list[str]:
        """One line per option: ``prefix.name=default: help`` (for ``--help`` and docs)."""
        fields = dataclasses.fields(cls)
        return [f"{prefix}.{f.name}={_shown(f.default)}: {f.metadata.get('help', '')}" for f in fields]


def _shown(value: Any) -> str:
    """A default as it is written on a command line or in YAML (``null`` for None)."""
    return "null" if value is None else str(value)


@dataclasses.dataclass(frozen=True)
class NoOptions(Options):
    """The options of a function that takes none (Dr. GRPO's advantage)."""


__all__ = ["NoOptions", "Options", "check_choice", "default_of", "option"]
