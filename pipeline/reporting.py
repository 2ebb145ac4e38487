"""How long-running stages report progress without knowing about terminals.

Library code calls a `Reporter`; the CLI passes one that draws rich progress bars, tests pass none.
"""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    def start(self, task: str, total: int, unit: str) -> None: ...

    def advance(self, task: str, n: int) -> None: ...


class Silent:
    def start(self, task: str, total: int, unit: str) -> None:
        pass

    def advance(self, task: str, n: int) -> None:
        pass
