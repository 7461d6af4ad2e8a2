"""The one registry shape every kind of named entry uses (projectors, optimizer methods, update rules, strategies).

A :class:`Registry` is a ``dict`` of name -> entry (so lookups, ``in`` and iteration read as usual) that adds
entries one way and looks them up one way: a taken name is refused unless ``replace=True``, an entry of the wrong
type is refused, and an unknown name is a ``ValueError`` that lists the registered names and the closest match.
"""

from __future__ import annotations

import difflib
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """Named entries of one type; an entry's name is its ``name`` attribute.

    Args:
        kind: the words for one entry in messages, e.g. ``"projector"``, ``"allocation strategy"``.
        entry_type: the class every entry must be an instance of.
    """

    def __init__(self, kind: str, entry_type: type[T]):
        super().__init__()
        self.kind = kind
        self.entry_type = entry_type

    def add(self, entry: T, *, replace: bool = False) -> T:
        """Registers ``entry`` under ``entry.name`` and returns it.

        Raises:
            ValueError: ``entry`` is not an ``entry_type``, or its name is taken and ``replace`` is False.
        """
        if not isinstance(entry, self.entry_type):
            wanted = self.entry_type.__name__
            article = "an" if wanted[0] in "AEIOU" else "a"
            raise ValueError(f"the {self.kind} registry takes {article} {wanted}, got {type(entry).__name__}")
        name = entry.name  # type: ignore[attr-defined]
        if name in self and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered (pass replace=True to replace it)")
        self[name] = entry
        return entry

    def lookup(self, name: object) -> T:
        """The entry registered as ``name``.

        Raises:
            ValueError: for an unknown name (or a non-string); the message lists the registered names.
        """
        entry = self.get(name) if isinstance(name, str) else None
        if entry is not None:
            return entry
        close = difflib.get_close_matches(str(name).lower(), list(self), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(self)}")

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self)
