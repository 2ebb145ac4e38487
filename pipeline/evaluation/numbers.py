"""How a rate and its interval read, everywhere they are shown (pages, Markdown, the terminal, alarm
sentences): × 100 with fixed digits, and an interval that could not vary called what it is.

One rule: an interval is *degenerate* when its bounds print the same at the precision shown (every
bootstrap replicate gave that value: for an AUC of 100, no resample mixed the classes), and it is then
written "interval not informative" instead of "[100.00, 100.00]".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

NOT_INFORMATIVE = "interval not informative"
NOT_INFORMATIVE_WHY = ("Every bootstrap replicate gave the same value (for AUC 100: no resample mixes the "
                       "classes), so this interval says nothing about how uncertain the value is.")


def missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def pct(value: Any, digits: int = 2) -> str:
    """A rate × 100 ('–' when undefined)."""
    return "–" if missing(value) else f"{100 * float(value):.{digits}f}"


def degenerate(lo: Any, hi: Any, digits: int = 2) -> bool:
    """An interval of zero width at the precision shown: the bootstrap could not vary the value."""
    return not (missing(lo) or missing(hi)) and pct(lo, digits) == pct(hi, digits)


def interval(lo: Any, hi: Any, digits: int = 2) -> str | None:
    """'[lo, hi]' × 100, 'interval not informative' for a degenerate one, None without one."""
    if missing(lo) or missing(hi):
        return None
    return NOT_INFORMATIVE if degenerate(lo, hi, digits) else f"[{pct(lo, digits)}, {pct(hi, digits)}]"


def estimate_text(estimate: Mapping[str, Any] | None, digits: int = 2) -> str:
    """Plain text of an estimate {value, lo, hi}: '82.61 [50.00, 100.00]' or '100.00 (interval not informative)'."""
    if not estimate or missing(estimate.get("value")):
        return "–"
    text = pct(estimate["value"], digits)
    bounds = interval(estimate.get("lo"), estimate.get("hi"), digits)
    return text if bounds is None else f"{text} ({bounds})" if bounds == NOT_INFORMATIVE else f"{text} {bounds}"
