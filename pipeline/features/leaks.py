"""What a leak scan found, for the stages that leave leaking samples out of their metrics.

`pipeline leaks` (the stage) writes each scan of one model's images at one threshold to
`leaks/<model_key>/image-t<threshold>-<fingerprint>.parquet`, stamped with the threshold and the
fingerprint of the embeddings it searched. `leaking_ids` reads the right scan back and refuses one
older than the embeddings.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.features.vectors import fingerprint, shards_of
from pipeline.store.layout import Store

# A compressed index (PQ, SQ8) only proposes neighbours: its scores are no test of the threshold.
# Measured (bench/leak_recall.py, 100k images, IVF98,PQ384x4fs): the codes scored planted pairs
# 0.06-0.16 below their exact cosine (all 2,000 were in the top 11), so a scan trusting them found
# 3% of the pairs. Every hit of a compressed index is scored again exactly from the vectors
# (k + 1 rows gathered per image) and kept if that score reaches the threshold.
DEFAULT_THRESHOLD = 0.95


META_THRESHOLD = b"pipeline.leak_threshold"


META_FINGERPRINT = b"pipeline.embeddings_fingerprint"


def leaking_ids(store: Store, model_key: str, threshold: float = DEFAULT_THRESHOLD) -> tuple[set[str], str]:
    """Evaluation samples (val/test) with a near or exact duplicate in an earlier split.

    Uses the scan of `pipeline leaks` at the lowest threshold ≤ `threshold`; returns the ids and
    the scan's fingerprint. Refuses when no scan exists or the embeddings changed since.
    """
    scans = []
    for path in sorted((store.dataset_dir("leaks") / model_key).glob("image-t*.parquet")):
        meta = pq.read_schema(path).metadata or {}
        t = float(meta.get(META_THRESHOLD, b"nan"))
        if t <= threshold + 1e-9:
            scans.append((t, path, meta.get(META_FINGERPRINT, b"").decode()))
    if not scans:
        raise PipelineError(
            f"No leak scan of {model_key} at threshold {threshold} or below: run "
            f"`pipeline leaks --model-key {model_key} --threshold {threshold}` first."
        )
    _, path, scanned = min(scans)
    current = fingerprint(store, shards_of(store, model_key, "image"))
    if scanned != current:
        raise PipelineError(
            f"The embeddings of {model_key} changed since `pipeline leaks` ran; run it again."
        )
    table = pq.read_table(path, columns=["sample_b", "similarity"])
    keep = table.filter(pc.greater_equal(table.column("similarity"), pa.scalar(threshold, pa.float32())))
    return set(keep.column("sample_b").to_pylist()), f"{path.name}@{threshold}"
