"""The ingest ledger: which source units were read, with which options, and where a growing file
resumes; the content keys every source shares (split by group hash, text hash); and the quarantine
rows both ingest and import-features write (a problem's key, a label conflict).

Ingest and import-features both record each unit (a file, or a manifest row) they read in the
`sources` dataset. A unit unchanged since (same path, size and time, or the same Parquet footer
fingerprint) with the same options is skipped unread: `unread` looks it up in the store's key sets
(`pipeline.store.keys`), never by a scan. A file that only grew is read from the resume point its
latest ledger row kept (`resume_points`).
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.sources.common import Resume, Unit, absolute, resume_holds
from pipeline.store import catalog
from pipeline.store.keys import KeyQuery, StoreKeys, keys_of
from pipeline.store.layout import Store
from schemas import SPLITS

# Keys (see `pipeline.store.keys`) of a ledger row as read by size and time, or by fingerprint, and of a
# quarantined input: the same SQL over the store's rows and over a batch's, so lookups need no scan.
_READ_BY_STAT = "concat_ws(chr(0), source_uri, coalesce(extra, chr(1)), size, mtime_ns)"


_READ_BY_PRINT = "concat_ws(chr(0), source_uri, coalesce(extra, chr(1)), fingerprint)"


def assign_split(group_key: str, fractions: tuple[float, ...], seed: str) -> str:
    """Deterministic split from a hash of the group key: same key, same split, on any machine."""
    digest = hashlib.sha256(f"{seed}\x00{group_key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions, strict=True):
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def ledger_queries(digest: str) -> dict[str, KeyQuery]:
    """Key-set queries (for `StoreKeys`) of the ledger rows written with these options."""
    these = f"options_digest = '{digest}'"  # a hex digest: nothing to escape
    return {"read by stat": KeyQuery("sources", _READ_BY_STAT, these),
            "read by print": KeyQuery("sources", _READ_BY_PRINT, f"{these} AND fingerprint IS NOT NULL")}


def resume_points(store: Store, digest: str, files: list[Path]) -> dict[str, Resume]:
    """Where each growing file's next read starts (by uri): the resume point of its latest ledger row
    with these options, if the bytes before it are still those read (taken on trust, with no read,
    when the file's size and time are those the row recorded). One query over the ledger."""
    if not files or not catalog.shard_paths(store, "sources"):
        return {}
    paths = {absolute(p): p for p in files}
    latest = catalog.query_with(store, """
        SELECT source_uri, size, mtime_ns, resume_offset, resume_tail, resume_rows FROM sources
        WHERE options_digest = ? AND source_uri IN (SELECT uri FROM growing)
        QUALIFY row_number() OVER (PARTITION BY source_uri ORDER BY recorded_at DESC) = 1
    """, {"growing": pa.table({"uri": list(paths)})}, [digest])
    points: dict[str, Resume] = {}
    for row in latest.to_pylist():
        if row["resume_offset"] is None:
            continue  # read before this ledger kept resume points, or a file that cannot be resumed
        point = Resume(row["resume_offset"], row["resume_tail"], row["resume_rows"] or 0)
        try:
            st = paths[row["source_uri"]].stat()
        except OSError:
            continue
        if (st.st_size, st.st_mtime_ns) == (row["size"], row["mtime_ns"]) or resume_holds(row["source_uri"], point):
            points[row["source_uri"]] = point
    return points


def unread(units: list[Unit], known: StoreKeys) -> list[Unit]:
    """The units the ledger does not hold as read, unchanged (same path, size and time, or same
    fingerprint), with the options of `known`'s `ledger_queries`: a lookup in key sets, no scan."""
    if not units or not catalog.shard_paths(known.store, "sources"):
        return units
    table = pa.table({
        "source_uri": [u.uri for u in units],
        "size": pa.array([u.size for u in units], pa.int64()),
        "mtime_ns": pa.array([u.mtime_ns for u in units], pa.int64()),
        "fingerprint": pa.array([u.fingerprint for u in units], pa.string()),
        "extra": pa.array([u.extra for u in units], pa.string()),
    })
    read = known.get("read by stat").contains(keys_of(table, _READ_BY_STAT))
    printed = np.array([u.fingerprint is not None for u in units])
    if printed.any():
        read |= printed & known.get("read by print").contains(keys_of(table, _READ_BY_PRINT))
    return [u for u, done in zip(units, read, strict=True) if not done]


def ledger_row(unit: Unit, digest: str, items: int, now: datetime,
               resume: Resume | None = None) -> dict[str, Any]:
    """The ledger row of a unit read; `resume`: where the next read of its (growing) file starts."""
    return {
        "source_uri": unit.uri,
        "size": unit.size,
        "mtime_ns": unit.mtime_ns,
        "fingerprint": unit.fingerprint,
        "extra": unit.extra,
        "options_digest": digest,
        "items": items,
        "recorded_at": now,
        "resume_offset": resume.offset if resume else None,
        "resume_tail": resume.tail if resume else None,
        "resume_rows": resume.rows if resume else None,
    }


# The key (see `pipeline.store.keys`) of a quarantined input: a rerun records the same problem at the
# same place once.
PROBLEM_KEY = ("concat_ws(chr(0), reason, coalesce(source_uri, chr(1)), coalesce(source_member, chr(1)), "
               "coalesce(source_row::VARCHAR, chr(1)))")


def conflict_row(row: dict[str, Any], other: str, other_label: int, now: datetime,
                 stage: str = "ingest") -> dict[str, Any]:
    """The quarantine row of a sample row whose bytes are labelled `other_label` at place `other`
    (import-features writes them too, as stage `import`): the claim of `row`, with its label and
    generator, which the `conflicts` view lists; the sample stored as `other_label` stays as it is."""
    here = where(row["source_uri"], row["source_member"], row["source_row"])
    detail = (f"the same bytes are labelled {LABEL_NAMES[int(row['label'])]} ({row['generator']}) at {here} "
              f"and {LABEL_NAMES[other_label]} at {other}; the store keeps the label it had until "
              "`pipeline conflicts resolve` says otherwise")
    return {
        "content_hash": row["sample_id"],
        "stage": stage,
        "reason": "label_conflict",
        "detail": detail,
        "source_uri": row["source_uri"],
        "source_member": row["source_member"],
        "source_row": row["source_row"],
        "recorded_at": now,
        "label": int(row["label"]),
        "generator": row["generator"],
    }


LABEL_NAMES = {0: "real", 1: "generated"}


def where(uri: str | None, member: str | None, row: int | None) -> str:
    """A place in a source, for a sentence: the file, the tar member or Parquet column, the row."""
    text = str(uri)
    if member:
        text += f" [{member}]"
    if row is not None:
        text += f" row {row}"
    return text
