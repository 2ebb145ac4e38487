"""What a reader's shard check costs per command, at the shard counts of an encoded D3 store.

An encoded D3 store (11.5M images, 2.3M texts; encode's 4,096 vectors a shard, ingest's 50,000
samples a shard) holds about 2,810 image and 565 text shards, 230 samples shards and a few hundred
ledger and quarantine shards. A shard's footer does not grow with its rows below one row group
(16,384 vectors, 131,072 samples), so this bench writes shards of that footer with few rows each,
commits them, and times in one process (CPU seconds, best of 3):

- `snapshot`: what every command pays now (manifest read, a stat per shard: nothing changed);
- `footer every time`: the same plus a footer digest per shard (the alternative: ~2x the syscalls);
- `footer, cold`: that, with each shard's pages dropped from the page cache first (posix_fadvise);
- `after cp -a`: every shard on a new inode: footers checked once, remembered in cache/checked.json;
- `after chmod`: every shard's change time moved in place: its pages checked against their CRCs, once;
  that check's speed (and a full decode's) is measured on one full-size shard (4,096 x 768 float16)
  and scaled to D3.
And the cost of CRC checks in `pipeline sql`'s scans (Arrow datasets), as a ratio to a scan without.

    python bench/bench_snapshot.py [--shards 3900] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.store import catalog, integrity, writes  # noqa: E402
from pipeline.store.atomic import write_parquet  # noqa: E402
from pipeline.store.layout import Store  # noqa: E402
from schemas import SAMPLES, embeddings_schema, from_columns  # noqa: E402

D3_VECTOR_BYTES = 13_800_000 * 768 * 2  # 11.5M image + 2.3M text vectors, float16
KEY = "ViT-L-14-bench"


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def best(fn, repeat: int = 3) -> tuple[float, float]:  # noqa: ANN001 - a bench helper
    """(CPU seconds, wall seconds), best of `repeat`."""
    runs = []
    for _ in range(repeat):
        c, w = cpu(), time.perf_counter()
        fn()
        runs.append((cpu() - c, time.perf_counter() - w))
    return min(runs)


def samples_table(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = [f"{x:064x}" for x in rng.integers(0, 2**62, rows)]
    return from_columns(SAMPLES, {
        "sample_id": pa.array(ids), "label": pa.array(rng.integers(0, 2, rows).astype(np.int8)),
        "generator": pa.array(["sd-xl"] * rows), "split": pa.array(["train"] * rows), "group_key": pa.array(ids),
        "text": pa.array([f"a caption number {i}" for i in range(rows)]), "text_hash": pa.array(ids),
        "source_format": pa.array(["d3"] * rows), "source_uri": pa.array(["/data/d3/train-00001.parquet"] * rows),
        "ingested_at": pa.array([datetime.now(UTC)] * rows, pa.timestamp("ms", "UTC"))})


def vectors_table(rows: int, seed: int, modality: str) -> pa.Table:
    rng = np.random.default_rng(seed)
    vec = rng.normal(size=(rows, 768)).astype(np.float16)
    return from_columns(embeddings_schema(768), {
        "model_key": pa.array([KEY] * rows), "modality": pa.array([modality] * rows),
        "content_hash": pa.array([f"{x:064x}" for x in rng.integers(0, 2**62, rows)]),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), 768),
        "norm": pa.array(np.ones(rows, np.float32))})


def build(store: Store, shards: int) -> list[Path]:
    n_samples = max(1, shards * 230 // 3900)
    n_text = max(1, shards * 565 // 3900)
    files = []
    for i in range(n_samples):
        files.append(write_parquet(samples_table(64, i), store.new_shard(store.dataset_dir("samples"), "samples")))
    for i in range(shards - n_samples):
        modality = "text" if i < n_text else "image"
        files.append(write_parquet(vectors_table(64, 10_000 + i, modality),
                                   store.embeddings_dir(KEY) / f"{modality}-{i:08d}.parquet"))
    with writes.writing(store, create=True):
        writes.commit(store, files)
    return files


def snapshot(root: Path) -> None:
    catalog.snapshot(Store(root))  # a new Store: what a new command does


def footers(files: list[Path]) -> None:
    for f in files:
        integrity.footer_digest(f)


def drop_cache(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=3900)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-snapshot-", dir=args.dir))
    try:
        store = Store(work / "store")
        started = time.perf_counter()
        files = build(store, args.shards)
        print(f"{len(files)} shards written and committed in {time.perf_counter() - started:.1f} s; "
              "footer of a vectors shard: "
              f"{int.from_bytes(files[-1].read_bytes()[-8:-4], 'little')} bytes")
        rows = []
        rows.append(("snapshot (nothing changed)", *best(lambda: snapshot(store.root))))
        rows.append(("footer digest of every shard", *best(lambda: footers(files))))

        def cold() -> None:
            drop_cache(files)
            footers(files)
        rows.append(("footer digest, pages dropped first", *best(cold)))
        copy = work / "copy"
        shutil.copytree(store.root, copy, copy_function=shutil.copy2)  # cp -a: new inodes, same mtimes
        c, w = cpu(), time.perf_counter()
        snapshot(copy)
        rows.append(("after cp -a: first command (footers)", cpu() - c, time.perf_counter() - w))
        rows.append(("after cp -a: next commands", *best(lambda: snapshot(copy))))
        for f in (store.root / Store(store.root).relative(p) for p in files):
            os.chmod(f, 0o640)  # change time moves, inode stays
        c, w = cpu(), time.perf_counter()
        snapshot(store.root)
        rows.append(("after chmod: first command (pages)", cpu() - c, time.perf_counter() - w))
        rows.append(("after chmod: next commands", *best(lambda: snapshot(store.root))))
        print(f"\n| check ({len(files)} shards) | CPU s | wall s | per shard, ms |\n|---|---|---|---|")
        for name, c, w in rows:
            print(f"| {name} | {c:.3f} | {w:.3f} | {1000 * w / len(files):.3f} |")
        big = write_parquet(vectors_table(4096, 1, "image"), work / "big" / "embeddings" / KEY / "image-big.parquet")
        size = big.stat().st_size
        for name, check in (("page CRCs checked", integrity.page_crc_problem),
                            ("decoded (pyarrow, CRCs on)", integrity.read_pages)):
            c, w = best(lambda check=check: check(big))
            print(f"one 4,096-vector shard ({size / 1e6:.1f} MB), {name}: {c * 1000:.0f} ms CPU "
                  f"({size / c / 1e9:.2f} GB/s warm); all of D3's vectors: {D3_VECTOR_BYTES / size * c:.0f} CPU s "
                  "(plus the disk's time when cold)")
        table = pa.concat_tables([samples_table(100_000, s) for s in range(10)])
        scan = work / "scan.parquet"
        write_parquet(table, scan)
        plain = ds.dataset([str(scan)], format="parquet")
        checked = ds.dataset([str(scan)], format=ds.ParquetFileFormat(
            default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True)))
        t_plain = best(lambda: plain.to_table(), 5)[0]
        t_checked = best(lambda: checked.to_table(), 5)[0]
        print(f"sql scan of 1M sample rows: {t_plain:.3f} CPU s plain, {t_checked:.3f} with CRCs "
              f"(x{t_checked / t_plain:.2f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
