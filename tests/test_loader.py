"""The feature stream: every row once per epoch, reshuffled, bounded memory, float32 out."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.features.loader import FeatureLoader, LoaderConfig
from pipeline.features.view import feature_table
from pipeline.store import catalog
from tests.conftest import planted_store


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory):
    store = planted_store(tmp_path_factory.mktemp("loader"), rows=2000, dim=8)
    return store, feature_table(store, "planted")


def test_each_epoch_yields_every_train_row_once_in_a_new_order(table) -> None:
    store, ft = table
    expected = catalog.query(store, "SELECT sample_id FROM samples WHERE split = 'train'").column(0).to_pylist()
    loader = FeatureLoader(ft, ("train",), LoaderConfig(batch_size=500, shuffle=True, buffer_rows=3000))
    orders = []
    for epoch in range(2):
        ids = np.concatenate([b.sample_id for b in loader.epoch(epoch)])
        assert sorted(ids.tolist()) == sorted(expected)
        orders.append(ids)
    assert not np.array_equal(orders[0], orders[1])
    again = np.concatenate([b.sample_id for b in loader.epoch(0)])
    assert np.array_equal(orders[0], again)  # same seed and epoch, same order


def test_memory_is_bounded_by_the_buffer_not_the_store(table) -> None:
    _, ft = table
    loader = FeatureLoader(ft, ("train",), LoaderConfig(batch_size=256, shuffle=True, buffer_rows=2048))
    total = sum(b.x.shape[0] for b in loader.epoch(0))
    assert total > 4 * 2048  # the split is much larger than the buffer ...
    assert loader.max_buffered < 2048 + 4096 + 256  # ... yet never more than buffer + one row group is held


def test_feature_sets_and_dtypes(table) -> None:
    _, ft = table
    for features, width in (("image", 8), ("text", 8), ("image+text", 16)):
        batch = next(FeatureLoader(ft, ("val",), LoaderConfig(features, batch_size=64)).epoch(0))
        assert batch.x.dtype == torch.float32 and batch.x.shape == (64, width)
        assert set(batch.split.tolist()) == {"val"}
    with pytest.raises(PipelineError, match="--features"):
        FeatureLoader(ft, ("val",), LoaderConfig("pixels"))


def test_feature_table_is_rebuilt_only_when_data_change(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=50, dim=4)
    first = feature_table(store, "planted")
    assert feature_table(store, "planted").path == first.path
    planted_store(tmp_path, rows=50, dim=4, seed=1, file_name="0001.h5")  # more samples
    assert feature_table(store, "planted").path != first.path
