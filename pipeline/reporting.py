"""How stages report progress and notable events without knowing about terminals.

Stages call a `Reporter`; the CLI passes one that draws rich progress bars and prints notes, tests
and library users pass `Silent()` (or nothing). A stage never prints.
"""

from __future__ import annotations

from typing import Any, Protocol


class Reporter(Protocol):
    def start(self, task: str, total: int | None, unit: str) -> None:
        """A long piece of work begins; `total` is None when unknown."""

    def advance(self, task: str, n: int) -> None: ...

    def note(self, message: str) -> None:
        """A sentence the user should see now (e.g. waiting for another writer)."""

    def event(self, kind: str, data: dict[str, Any]) -> None:
        """A structured record as it happens (e.g. kind 'epoch' with the epoch's metrics)."""


class Silent:
    def start(self, task: str, total: int | None, unit: str) -> None:
        pass

    def advance(self, task: str, n: int) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def event(self, kind: str, data: dict[str, Any]) -> None:
        pass
