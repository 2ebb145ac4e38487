"""D3's generator column order, checked wherever it is assumed rather than read.

Only D3's Parquet form names the generator of `image_gen{k}` (its `model_gen{k}`). The other forms
hold the same columns without names: a webdataset record's `gen_{k}` is `image_gen{k}` re-encoded
(CoDE's shards; the bytes differ, so no sample id ties them), and the reference code's h5
`image_gen{k}` is the CLIP vector of the Parquet column of that name. `--generators` names them; a
wrong order gives three of four generators another's name and nothing else notices. So a D3 ingest
or an h5 import compares the order it uses with what it can see:

- the Parquet rows it reads (their `model_gen0..3`) against the order in use (`--generators`), which
  the other forms of the same rows need;
- the store's samples of the other forms (one aggregate over `samples_all`: a column scan whatever
  the store's size, a dozen groups in memory), the Parquet form's names being the truth;
- a nameless form named by a reordering of D3's four generators that is not D3's order (the old
  default of this tool, kept in scripts).

Each disagreement is one sentence saying which `--generators` to pass; the stage carries them in its
result and notes them through its reporter (a nameless form's before anything is written).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.reporting import Reporter
from pipeline.sources.generators import canonical
from pipeline.store import catalog
from pipeline.store.layout import Store

Form = Literal["parquet", "webdataset", "h5"]
Order = tuple[str | None, ...]  # the canonical name of columns 0..3 (None: no sample of that column)
# D3's order, read from its Parquet rows (e.g. id 1275001022128: model_gen0..3 are DeepFloyd/IF-I-M-v1.0,
# SD 2.1, SD XL base 1.0, SD 1.4); CoDE's shards and the reference code's h5 keep the columns in it
D3_ORDER = ("deepfloyd-if", "sd-2.1", "sd-xl", "sd-1.4")
_KEPT = 16  # distinct orders of Parquet rows tallied (D3 has one); rows beyond are counted apart
_COLUMNS = {"parquet": "image_gen0..3", "webdataset": "gen_0..gen_3", "h5": "image_gen0..3"}
_WHAT = {"parquet": "D3 Parquet samples", "webdataset": "D3 webdataset samples", "h5": "h5 features"}
# the column each generated D3 sample came from: its webdataset slot (`gen_k`, kept as its original
# name), else its Parquet or h5 column (`image_genk`). A dozen groups: every D3 source names its
# generated samples so (filtering in SQL on the computed slot costs half as much again)
_STORED = """
    SELECT source_format, generator,
           CASE WHEN source_format = 'd3' AND generator_original LIKE 'gen\\_%' ESCAPE '\\'
                THEN generator_original ELSE source_member END AS slot,
           count(*) AS n
    FROM samples_all WHERE label = 1 AND source_format IN ('d3', 'features:h5')
    GROUP BY ALL
"""
_SLOTS = {**{f"image_gen{k}": k for k in range(4)}, **{f"gen_{k}": k for k in range(4)}}


@dataclass
class OrderTally:
    """How many D3 Parquet rows name their columns in each order (`model_gen0..3` as written) and the
    first file that did; at most `_KEPT` orders are kept, rows in any other counted in `others`."""

    rows: Counter[tuple[str, ...]] = field(default_factory=Counter)
    files: dict[tuple[str, ...], Path] = field(default_factory=dict)
    others: int = 0

    def add(self, names: tuple[str, ...], path: Path) -> None:
        seen = self.rows.get(names)  # once per row: one lookup in the common case
        if seen is not None:
            self.rows[names] = seen + 1
        elif len(self.rows) < _KEPT:
            self.rows[names], self.files[names] = 1, path
        else:
            self.others += 1

    def orders(self) -> list[tuple[Order, int, Path]]:
        """The orders found in canonical names, most rows first: (order, rows, first file)."""
        merged: Counter[Order] = Counter()
        first: dict[Order, Path] = {}
        for names, n in self.rows.items():
            order = tuple(canonical(name) for name in names)
            merged[order] += n
            first.setdefault(order, self.files[names])
        return [(order, n, first[order]) for order, n in merged.most_common()]


def stored_orders(store: Store) -> dict[Form, Order]:
    """The order in which the store's samples of each D3 form name columns 0..3 (by most samples)."""
    if not catalog.shard_paths(store, "samples"):
        return {}
    with catalog.connect(store) as con:
        con.execute("SET enable_progress_bar = false")  # DuckDB draws one on stderr past 2 s
        groups = con.sql(_STORED).fetchall()
    counts: dict[tuple[Form, int], Counter[str]] = {}
    for source_format, generator, slot, n in groups:
        if slot not in _SLOTS:
            continue
        form: Form = "h5" if source_format == "features:h5" else "parquet" if slot[0] == "i" else "webdataset"
        counts.setdefault((form, _SLOTS[slot]), Counter())[generator] += n
    forms = {form for form, _ in counts}
    return {form: tuple(counts[(form, k)].most_common(1)[0][0] if (form, k) in counts else None for k in range(4))
            for form in sorted(forms)}


@dataclass
class OrderCheck:
    """The order one D3 ingest or h5 import uses, against the store's other forms and, for the
    Parquet form, against the rows it reads (`tally`, filled while reading). The store is read at
    the first need (a run that reads nothing pays nothing): for a nameless form, before its run
    writes (call `tell` first); the Parquet form's runs add no sample of the forms it is compared with."""

    store: Store
    form: Form
    in_use: tuple[str, ...]
    tally: OrderTally = field(default_factory=OrderTally)
    told: list[str] = field(default_factory=list)
    _stored: dict[Form, Order] | None = None

    def __post_init__(self) -> None:
        self.in_use = tuple(canonical(g) for g in self.in_use)

    @property
    def stored(self) -> dict[Form, Order]:
        if self._stored is None:
            self._stored = stored_orders(self.store)
        return self._stored

    def warnings(self) -> list[str]:
        if self.form == "parquet":
            return [line for order, n, path in self.tally.orders() for line in self._parquet(order, n, path)]
        lines = [self._nameless(other, order) for other, order in self.stored.items()
                 if other != self.form and _disagree(order, self.in_use)]
        if not lines and set(self.in_use) == set(D3_ORDER) and self.in_use != D3_ORDER:
            lines.append(f"{_COLUMNS[self.form]} are named {_names(self.in_use)} (--generators), a reordering of "
                         f"D3's {_names(D3_ORDER)} (the model_gen0..3 of its Parquet rows, which CoDE's shards "
                         f"and the reference code's h5 keep): if these are ELSA D3, pass --generators "
                         f"{_flag(D3_ORDER)}.")
        return lines

    def tell(self, reporter: Reporter) -> list[str]:
        """The warnings as they stand; those not noted before are noted now."""
        lines = self.warnings()
        for line in lines:
            if line not in self.told:
                reporter.note(line)
                self.told.append(line)
        return lines

    def _parquet(self, order: Order, n: int, path: Path) -> list[str]:
        where = f"{n} D3 Parquet rows (the first in {path.name})"
        lines = []
        if _disagree(order, self.in_use):
            lines.append(f"{where} name image_gen0..3 {_names(order)} (their model_gen0..3), not "
                         f"{_names(self.in_use)} (--generators, the names given to D3's webdataset form and h5 "
                         f"features): their samples take the Parquet's names; pass --generators {_flag(order)} "
                         "with the webdataset form or h5 features of these rows.")
        for other, stored in self.stored.items():
            if other != "parquet" and _disagree(stored, order):
                again = "ingest the webdataset form" if other == "webdataset" else "import the h5 features"
                lines.append(f"This store's {_WHAT[other]} name {_COLUMNS[other]} {_names(stored)}, but {where} "
                             f"say image_gen0..3 are {_names(order)} (their model_gen0..3): per-generator numbers "
                             f"now mix two namings; {again} again into a new store with --generators {_flag(order)}.")
        return lines

    def _nameless(self, other: Form, order: Order) -> str:
        mine = f"{_COLUMNS[self.form]} of this {'webdataset' if self.form == 'webdataset' else 'h5 source'}"
        if other == "parquet":
            return (f"This store's D3 Parquet samples name image_gen0..3 {_names(order)} (their model_gen0..3), "
                    f"but {mine} are named {_names(self.in_use)} (--generators): if both are ELSA D3, pass "
                    f"--generators {_flag(order)}, into a new store if this run has written samples (they keep "
                    f"the names they were given).")
        return (f"This store's {_WHAT[other]} name {_COLUMNS[other]} {_names(order)}, but {mine} are named "
                f"{_names(self.in_use)} (--generators): one of the two is wrong; D3's own order (the model_gen0..3 "
                f"of its Parquet rows) is --generators {_flag(D3_ORDER)}.")


def _disagree(a: Order, b: Order) -> bool:
    """Some column both name, named differently."""
    return any(x is not None and y is not None and x != y for x, y in zip(a, b, strict=False))


def _names(order: Order) -> str:
    return ", ".join(name or "?" for name in order)


def _flag(order: Order) -> str:
    return ",".join(name or "?" for name in order)
