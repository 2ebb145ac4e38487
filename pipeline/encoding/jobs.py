"""An encode job as engines see it: the work order (`EncodeJob`), what running it did (`JobResult`),
and how encoded rows become staged shards (`stage_encoded`).

The `encode` stage finds the pending rows of one modality, writes them to a Parquet file and hands
an `EncodeJob` to an engine (`pipeline.engines`): plain data, so a Ray worker on another node can
hold it. Every engine runs the units of `pipeline.encoding.units` over it and stages complete
shards with `stage_encoded`; the process holding the writer lock commits them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pyarrow as pa

from pipeline.encoding.units import EncodeSpec, split_encoded
from pipeline.store.layout import Store
from pipeline.store.writes import stage_shard


@dataclass(frozen=True)
class EncodeJob:
    """One modality's pending work for one model."""

    store: Store
    spec: EncodeSpec  # the model, its preprocessing, device and precision: what a worker rebuilds
    modality: Literal["image", "text"]
    pending: Path  # Parquet file of pending rows, sorted for locality
    rows: int
    batch_size: int
    shard_rows: int


@dataclass
class JobResult:
    """What one job did: vectors written, inputs quarantined (by reason), shards committed, time."""

    encoded: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    shards: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    forward_passes: int = 0
    device: str = ""

    @property
    def items(self) -> int:
        """Inputs the job finished with: encoded or quarantined (what its progress bar counted)."""
        return self.encoded + sum(self.quarantined.values())

    def count(self, encoded: pa.Table) -> None:
        """Add the outcomes of a batch of encoded rows (a vector, or a reason)."""
        vectors, reasons = encoded.column("vector"), encoded.column("reason")
        self.encoded += len(vectors) - vectors.null_count
        if reasons.null_count < len(reasons):
            self.quarantined.update(r for r in reasons.to_pylist() if r is not None)


def stage_encoded(store: Store, spec: EncodeSpec, encoded: pa.Table) -> list[Path]:
    """Write encoded rows as complete staged shards (embeddings, quarantine); return their paths.

    A shard's name derives from the hashes it holds, so a retried worker rewrites its own file
    instead of adding a second copy of the same rows.
    """
    if not encoded.num_rows:
        return []
    embeddings, quarantine = split_encoded(encoded, spec, datetime.now(UTC))
    hashes = sorted(encoded.column("content_hash").to_pylist())
    digest = hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:20]
    modality = encoded.column("modality")[0].as_py()
    staged: list[Path] = []
    if quarantine.num_rows:
        final = store.dataset_dir("quarantine") / f"decode-{spec.model_key[:40]}-{digest}.parquet"
        staged.append(stage_shard(store, final, quarantine))
    if embeddings.num_rows:
        final = store.embeddings_dir(spec.model_key) / f"{modality}-{digest}.parquet"
        staged.append(stage_shard(store, final, embeddings))
    return staged
