"""`pipeline conflicts list|resolve`: the same bytes brought under two labels, and the user's decision.

Ingest never lets a conflict change training data: the sample keeps the label it was stored with and
the other claim waits in the `conflicts` view. `resolve SAMPLE --label real|generated|none` records a
decision (a `decisions` row, appended: nothing is rewritten), which the `samples` view applies from
then on: relabelled, or left out (`none`). `--undo` reverses the latest decision of that sample
(decisions form a stack per sample; undoing the last one restores the sample as ingested).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from pipeline.choices import Decision
from pipeline.config import Validated
from pipeline.errors import PipelineError
from pipeline.reporting import Reporter, Silent
from pipeline.sources.ledger import LABEL_NAMES
from pipeline.store import catalog, writes
from pipeline.store.atomic import write_parquet
from pipeline.store.layout import Store
from pipeline.store.writes import require_writable, writing
from schemas import DECISIONS, from_rows

UNDO = "undo"  # the note of a decision that reverses the one before it
_LABELS = {"real": 0, "generated": 1}


@dataclass(frozen=True)
class ConflictsConfig(Validated):
    store: Store
    sample_id: str | None = None  # resolve this sample (a unique prefix of 6+ characters); None: list them
    label: Decision | None = None  # real | generated | none (use as neither)
    generator: str | None = None  # with --label generated: the generator (default: the one a source gave)
    undo: bool = False  # reverse the sample's latest decision
    wait: bool = True

    def check(self) -> None:
        if self.sample_id is None:
            if self.label is not None or self.undo or self.generator is not None:
                raise PipelineError("--label, --generator and --undo decide one sample: give its id.")
            return
        if len(self.sample_id) < 6:
            raise PipelineError("A sample id needs at least 6 characters (a unique prefix will do).")
        if (self.label is None) == (not self.undo):
            raise PipelineError("Give exactly one of --label real|generated|none or --undo.")
        if self.generator is not None and self.label != "generated":
            raise PipelineError("--generator goes with --label generated.")


@dataclass
class ConflictsResult:
    conflicts: pa.Table  # the `conflicts` view (all of it, or the resolved sample's row)
    decided: str | None = None  # a sentence: what the decision did


def run(config: ConflictsConfig, reporter: Reporter | None = None) -> ConflictsResult:
    """List the conflicts, or record one decision (under the writer lock) and show its row after."""
    reporter = reporter or Silent()
    store = config.store
    if config.sample_id is None:
        return ConflictsResult(catalog.query(store, "SELECT * FROM conflicts"))
    require_writable(store, "conflicts resolve", "the decision, in decisions/")
    with writing(store, reporter, config.wait):
        row = _conflict(store, config.sample_id)
        sample = row["sample_id"]
        before = _state(row)
        decision = _undo(store, sample) if config.undo else _decide(config, row)
        decision.update({"sample_id": sample, "decided_at": _after_the_last(store, sample)})
        path = write_parquet(from_rows(DECISIONS, [decision]),
                             store.new_shard(store.dataset_dir("decisions"), "resolve"))
        writes.commit(store, [path])
    after = catalog.query(store, "SELECT * FROM conflicts WHERE sample_id = ?", [sample])
    now = _state(after.to_pylist()[0])
    sentence = (f"Sample {sample[:16]} is now {now} (was {before}); the next `pipeline train` learns from it so, "
                "runs made before keep their numbers."
                + ("" if config.undo else f" `pipeline conflicts resolve {sample[:16]} --undo` reverses this."))
    return ConflictsResult(after, sentence)


# --- private -------------------------------------------------------------------------------


def _conflict(store: Store, prefix: str) -> dict[str, Any]:
    found = catalog.query(store, "SELECT * FROM conflicts WHERE starts_with(sample_id, ?) LIMIT 2", [prefix])
    if not found.num_rows:
        raise PipelineError(f"No label conflict for a sample starting {prefix!r}; `pipeline conflicts list` shows "
                            "them all.")
    if found.num_rows > 1:
        raise PipelineError(f"{prefix!r} starts several conflicting sample ids; give more characters.")
    return found.to_pylist()[0]


def _after_the_last(store: Store, sample: str) -> datetime:
    """Now, or a millisecond (the stored precision) after the sample's latest decision if that is not
    earlier: the order of a sample's decisions is their time, so two never share one."""
    now = datetime.now(UTC)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    last = catalog.query(store, "SELECT max(decided_at) FROM decisions WHERE sample_id = ?", [sample]).column(0)[0]
    latest = last.as_py()
    return now if latest is None or now > latest else latest + timedelta(milliseconds=1)


def _state(row: dict[str, Any]) -> str:
    """How training uses the sample, in words."""
    if row["label"] is None:
        return "left out of training"
    return f"{LABEL_NAMES[int(row['label'])]} ({row['generator']})"


def _decide(config: ConflictsConfig, row: dict[str, Any]) -> dict[str, Any]:
    note = f"conflicts resolve --label {config.label}"
    if config.label == "none":
        return {"action": "exclude", "label": None, "generator": None, "note": note}
    label = _LABELS[str(config.label)]
    if label == 0:
        return {"action": "relabel", "label": 0, "generator": "real", "note": note}
    named = [row[f"{who}_generator"] for who in ("claimed", "stored") if row[f"{who}_label"] == 1]
    generator = config.generator or next((g for g in named if g), None)
    if generator is None:
        raise PipelineError("No source named a generator for this sample: give --generator NAME with --label "
                            "generated.")
    return {"action": "relabel", "label": 1, "generator": generator, "note": f"{note} --generator {generator}"}


def _undo(store: Store, sample: str) -> dict[str, Any]:
    """The decision that puts back the state before the sample's latest decision (a stack: each undo
    pops one; an empty stack is the sample as ingested)."""
    history = catalog.query(store, "SELECT action, label, generator, note FROM decisions WHERE sample_id = ? "
                            "AND action IN ('relabel', 'exclude', 'restore') ORDER BY decided_at",
                            [sample]).to_pylist()
    stack: list[dict[str, Any]] = []
    for decision in history:
        if decision["note"] == UNDO:
            if stack:
                stack.pop()
        else:
            stack.append(decision)
    if not stack:
        raise PipelineError(f"Sample {sample[:16]} has no decision to undo: it is as ingested.")
    stack.pop()
    back = stack[-1] if stack else {"action": "restore", "label": None, "generator": None}
    return {"action": back["action"], "label": back["label"], "generator": back["generator"], "note": UNDO}
