"""Tables for the terminal that fit its width without breaking what identifies something.

Each column says what kind of values it holds, and that decides how a narrow terminal may break it:

- `token`: identifiers (run ids, sample ids, generator names, model keys, paths): never broken;
- `number`: numbers, right-aligned, never broken (a cell that may take several lines, such as a value
  over its interval, says where with its own line breaks);
- `label`: words, lists of numbers (a method's name, a status, `[1.5, 2.25]`): break only at spaces;
- `text`: free text (captions, details, JSON): one line, cut with "…" when space is short; the
  full value is one `--format csv/json` away.

Rich lays the table out and wraps or cuts each cell; this module only chooses the column widths,
because rich's own shrinking ignores a column's minimum once every column must shrink (it squeezes
the widest columns evenly and then crops the line). When even the narrowest layout is wider than
the terminal, each row is shown as a record, one `column  value` line per cell (as psql's expanded
display), so nothing is broken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

Kind = Literal["token", "number", "label", "text"]
TEXT_FLOOR = 12  # narrowest a free-text column is cut to (a few words still read)
_PAD = 1  # a space after each cell but the last (and the line between columns: two spaces in all)
Cell = str | Text


@dataclass(frozen=True)
class Column:
    header: str
    kind: Kind = "label"


@dataclass(frozen=True)
class Shown:
    """How a table went out: as a grid or as records, and whether any free text was cut."""

    records: bool
    cut: bool


def _plain(cell: Cell) -> str:
    return cell.plain if isinstance(cell, Text) else cell


def _longest_word(value: str) -> int:
    return max((cell_len(w) for w in value.split()), default=0)


def _widest_line(value: str) -> int:
    return max((cell_len(line) for line in value.splitlines()), default=0)


def _bounds(column: Column, cells: list[str]) -> tuple[int, int]:
    """(narrowest, widest) content width of a column: the header may wrap between its words only."""
    widest = max([_widest_line(c) for c in cells] + [_widest_line(column.header)])
    header = _longest_word(column.header)
    if column.kind in ("token", "number"):
        return max(header, *(_widest_line(c) for c in cells), 1), widest
    if column.kind == "text":
        return max(header, min(TEXT_FLOOR, widest), 1), widest
    return max(header, *(_longest_word(c) for c in cells), 1), widest


def widths(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], width: int) -> list[int] | None:
    """Content width per column so that the table fits `width` (None when it cannot).

    Every column gets at least its narrowest width; what is left goes first to numbers, labels and
    tokens (so they break as little as possible), then to free text, each share in proportion to
    how much the column still lacks.
    """
    cells = [[_plain(row[i]) for row in rows] for i in range(len(columns))]
    bounds = [_bounds(c, col) for c, col in zip(columns, cells, strict=True)]
    room = width - _extra(len(columns)) - _PAD * (len(columns) - 1)
    chosen = [low for low, _ in bounds]
    if sum(chosen) > room:
        return None
    for texts in (False, True):
        room_left = room - sum(chosen)
        wanting = [i for i, c in enumerate(columns) if (c.kind == "text") == texts and chosen[i] < bounds[i][1]]
        lacking = sum(bounds[i][1] - chosen[i] for i in wanting)
        if not lacking or room_left <= 0:
            continue
        for i in wanting:
            chosen[i] += min(bounds[i][1] - chosen[i], room_left * (bounds[i][1] - chosen[i]) // lacking)
        for i in wanting:  # the remainder of the integer shares, a column at a time
            extra = min(bounds[i][1] - chosen[i], room - sum(chosen))
            chosen[i] += max(extra, 0)
    return chosen


def _extra(columns: int) -> int:
    return columns - 1  # the box's (blank) line between columns; no frame: at 80 columns every one counts


def _cell(value: Cell, kind: Kind, width: int) -> tuple[Text, bool]:
    text = value.copy() if isinstance(value, Text) else Text(value)
    if kind == "text":
        text.no_wrap, text.overflow = True, "ellipsis"
        return text, _widest_line(text.plain) > width
    if kind in ("token", "number"):  # (the widths above make room: nothing is cropped; "ignore" would not justify)
        text.no_wrap, text.overflow = True, "crop"
    else:
        text.overflow = "fold"  # only a word wider than the column folds: the widths above prevent it
    return text, False


def grid(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], width: int) -> tuple[Table, bool] | None:
    """The rows as one table `width` wide at most, and whether any text was cut; None if none fits."""
    chosen = widths(columns, rows, width)
    if chosen is None:
        return None
    stacked = any(w < _widest_line(_plain(row[i])) for row in rows for i, w in enumerate(chosen)
                  if columns[i].kind == "label") or any("\n" in _plain(c) for row in rows for c in row)
    # rows that take several lines get a blank line between them, so a cell is not read as the next row's
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False, pad_edge=False, padding=(0, _PAD, 0, 0),
                  show_lines=stacked)
    for column, w in zip(columns, chosen, strict=True):
        header = Text(column.header, no_wrap=False, overflow="fold")  # a header may wrap between its words
        table.add_column(header, width=w, justify="right" if column.kind == "number" else "left",
                         no_wrap=column.kind != "label", overflow="fold")
    cut = False
    for row in rows:
        cells = []
        for value, column, w in zip(row, columns, chosen, strict=True):
            text, was_cut = _cell(value, column.kind, w)
            cells.append(text)
            cut |= was_cut
        table.add_row(*cells)
    return table, cut


def records(columns: Sequence[Column], rows: Sequence[Sequence[Cell]]) -> Table:
    """One block per row, a `column  value` line per cell; free text wraps between words, whole."""
    tokens = [_widest_line(_plain(row[i])) for row in rows for i, c in enumerate(columns)
              if c.kind in ("token", "number")]
    table = Table(box=box.SIMPLE_HEAD, show_header=False, show_edge=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    # an identifier longer than the terminal is printed whole all the same: the terminal wraps that line
    table.add_column(overflow="fold", min_width=max(tokens, default=None))
    for number, row in enumerate(rows, 1):
        if len(rows) > 1:
            table.add_row(Text(f"row {number}", style="dim"), "")
        for value, column in zip(row, columns, strict=True):
            text = value.copy() if isinstance(value, Text) else Text(value)
            if column.kind in ("token", "number"):
                text.no_wrap = True
            table.add_row(column.header, text)
        table.add_section()
    return table


def show(console: Console, columns: Sequence[Column], rows: Sequence[Sequence[Cell]],
         title: str | None = None) -> Shown:
    """Print the rows as a table that fits the console, or as records when no table does."""
    if title:
        console.print(Text(title, style="bold"))
    fitted = grid(columns, rows, console.width)
    if fitted is not None:
        table, cut = fitted
        console.print(table)
        return Shown(records=False, cut=cut)
    console.print(records(columns, rows))
    return Shown(records=True, cut=False)
