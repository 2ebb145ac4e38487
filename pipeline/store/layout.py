"""The store's layout on disk: where each dataset's Parquet shards live.

A store is a self-describing, movable directory. Paths kept in the catalog are relative to it.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_STORE = Path("data/store")
DATASETS = ("samples", "embeddings", "quarantine", "runs", "scores", "indexes", "leaks")


@dataclass(frozen=True)
class Store:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    def dataset_dir(self, dataset: str) -> Path:
        return self.root / dataset

    def embeddings_dir(self, model_key: str) -> Path:
        return self.root / "embeddings" / model_key

    def model_info(self, model_key: str) -> dict[str, Any]:
        """What `encode` recorded about a model key (architecture, weights, random_weights, dim…); {} if imported."""
        path = self.embeddings_dir(model_key) / "model.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def new_shard(self, directory: Path, prefix: str) -> Path:
        """A fresh, sortable, collision-free shard name: prefix-<ms timestamp>-<random>.parquet."""
        return directory / f"{prefix}-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}.parquet"

    def relative(self, path: Path) -> str:
        return path.resolve().relative_to(self.root.resolve()).as_posix()

    def exists(self) -> bool:
        return self.catalog_path.exists()


_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_name(text: str) -> str:
    """Make `text` usable as one path component (model keys contain tags such as hf-hub:org/x)."""
    return _SAFE.sub("_", text).strip("_") or "_"
