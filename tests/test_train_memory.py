"""Train's memory per scored sample: scoring and metrics keep numbers, not ids or names, per sample.

tracemalloc counts what Python and numpy allocate (every str, object array and numpy temporary of
the scoring and metrics path; not torch's or Arrow's pools, which hold batches, not samples). A
run on ten times the samples may cost only a few dozen bytes more per added sample: the old path
(ids and group keys as Python strings, fixed-width string copies) cost over 300 here (short group
keys), 1.7 KB a sample of resident memory on a D3-shaped store.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from pipeline.runs.config import TrainConfig
from pipeline.stages import train
from pipeline.store.layout import Store
from tests.conftest import planted_store
from trainer import metrics

ROWS = 300  # D3 rows of the small store (5 samples each); the large one has ten times as many
BYTES_PER_SAMPLE = 100  # measured 30 (the numbers kept, the metrics' sort temporaries); the old path 316


def _peak(store: Store) -> int:
    config = TrainConfig.from_dict({"epochs": 1, "steps_per_epoch": 1, "batch_size": 64, "hidden": 8,
                                    "features": "image"})
    tracemalloc.start()
    try:
        train.run(train.TrainJob(store, config))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_scoring_and_metrics_memory_grows_by_a_few_bytes_a_sample(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # bootstrap blocks of a fixed size at both store sizes (they are bounded by cells, not samples)
    monkeypatch.setattr(metrics, "CELLS_PER_CHUNK", 20_000)
    small = planted_store(tmp_path / "small", rows=ROWS, dim=8)
    large = planted_store(tmp_path / "large", rows=10 * ROWS, dim=8)
    _peak(small)  # warm up: imports and caches made once
    grown = _peak(large) - _peak(small)
    per_sample = grown / (9 * 5 * ROWS)
    assert per_sample < BYTES_PER_SAMPLE, f"{per_sample:.0f} bytes a sample"


def test_the_allocator_threshold_is_fixed_on_glibc() -> None:
    import platform

    from pipeline.allocator import fix_mmap_threshold

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert fix_mmap_threshold() is True
