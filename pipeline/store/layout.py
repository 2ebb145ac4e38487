"""The store's layout on disk: where each dataset's Parquet shards live.

A store is a self-describing, movable directory. Paths kept in the catalog are relative to it.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_STORE = Path("data/store")
DATASETS = ("samples", "embeddings", "quarantine", "runs", "scores", "indexes", "leaks", "metrics", "sources",
            "decisions")


@dataclass(frozen=True)
class Store:
    root: Path
    # The catalog snapshot this Store object carries down a command (`pipeline.store.catalog.snapshot`):
    # a one-item list, so a frozen Store can hold it; not part of equality, hashing or pickling.
    snapshot_slot: list[Any] = field(default_factory=list, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Store, (self.root,))  # a worker process opens its own snapshot

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def manifest_path(self) -> Path:
        """The committed shard list, replaced atomically by the writer on every commit."""
        return self.root / "manifest.json"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    @property
    def staging_dir(self) -> Path:
        """Where workers put complete shards for the lock holder to commit (same layout as the store)."""
        return self.root / "staging"

    @property
    def work_dir(self) -> Path:
        """Scratch space of the writer-lock holder inside the store (pending-row files, Ray probes and Tune
        trials): inside, so that Ray workers on other nodes see it; outside `staging/` and the datasets,
        so that nobody adopts or registers what lies there."""
        return self.root / ".encode"

    def staged(self, final: Path) -> Path:
        """The staging path of a shard whose final place in the store is `final`."""
        return self.staging_dir / Path(final).resolve().relative_to(self.root.resolve())

    def dataset_dir(self, dataset: str) -> Path:
        return self.root / dataset

    def embeddings_dir(self, model_key: str) -> Path:
        return self.root / "embeddings" / model_key

    def model_info(self, model_key: str) -> dict[str, Any]:
        """What `encode` or `import-features` recorded about a model key (architecture, weights, dim…)."""
        path = self.embeddings_dir(model_key) / "model.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def record_model(self, model_key: str, info: dict[str, Any]) -> None:
        """Write model.json once; later writers must agree on the stored vectors' dtype and dim."""
        from pipeline.errors import PipelineError
        from pipeline.store.atomic import write_text

        old = self.model_info(model_key)
        if old:
            if old.get("dtype") != info.get("dtype") or old.get("dim") != info.get("dim"):
                raise PipelineError(
                    f"The store holds {old.get('dtype')} vectors of dim {old.get('dim')} for {model_key}, "
                    f"not {info.get('dtype')} of dim {info.get('dim')}; use --dtype {old.get('dtype')} "
                    "or another store."
                )
            return
        write_text(self.embeddings_dir(model_key) / "model.json", json.dumps(info, indent=2, default=str))

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def run_report_dir(self, run_id: str) -> Path:
        """Where `pipeline report` writes a run's page unless told otherwise."""
        return self.reports_dir / f"run-{run_id}"

    def new_shard(self, directory: Path, prefix: str) -> Path:
        """A fresh, sortable, collision-free shard name: prefix-<ms timestamp>-<random>.parquet."""
        return directory / f"{prefix}-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}.parquet"

    def relative(self, path: Path) -> str:
        return path.resolve().relative_to(self.root.resolve()).as_posix()

    def exists(self) -> bool:
        return self.root.is_dir() and (self.manifest_path.exists() or self.catalog_path.exists())


_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_name(text: str) -> str:
    """Make `text` usable as one path component (model keys contain tags such as hf-hub:org/x)."""
    return _SAFE.sub("_", text).strip("_") or "_"
