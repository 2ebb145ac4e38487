"""`import-features` against the floor: how fast could the bytes move on this machine, and how fast
does the stage move them? D3-shaped HDF5 sources (768-d float16, as bench_scale writes them) are made
once (--sources DIR keeps them between runs), then imported into a fresh store by each code tree
given (--tree DIR, repeatable: a checkout such as `git worktree add /tmp/base <commit>`), each in
its own process so CPU seconds are the stage's own.

    python bench/bench_import.py --rows 1000000 --sources /tmp/h5-1m --floor --tree . --tree /tmp/base

The floor: write+fsync of a 1 GB file, reading it back after it is dropped from the page cache
(posix_fadvise; a measure of the disk where the kernel honours it), a numpy copy, float16 <->
float32 casts (numpy's and torch's, CPU time), SHA-256 and MD5
over 3 KB rows (a vector's float32 bytes, what `vector_hash` hashes); then one 250 MB embeddings
shard written by `write_parquet` and by pyarrow's writer as `write_parquet` called it before.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_scale import write_sources  # noqa: E402

FLOOR_BYTES = 1 << 30


def floor(directory: Path) -> dict[str, float]:
    """MB/s of the moves the stage cannot avoid, measured here and now."""
    out: dict[str, float] = {}
    block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
    path = directory / "floor.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(FLOOR_BYTES // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    out["disk_write_fsync_mb_s"] = FLOOR_BYTES / 1e6 / (time.perf_counter() - t)
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass
    out["disk_read_uncached_mb_s"] = FLOOR_BYTES / 1e6 / (time.perf_counter() - t)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass
    out["read_page_cache_mb_s"] = FLOOR_BYTES / 1e6 / (time.perf_counter() - t)
    path.unlink()
    a = np.frombuffer(block, np.uint8)
    b = np.empty_like(a)
    t = time.perf_counter()
    for _ in range(8):
        np.copyto(b, a)
    out["memcpy_mb_s"] = 8 * len(a) / 1e6 / (time.perf_counter() - t)
    out.update(cast_rates())
    rows = np.frombuffer(block[: 3072 * 20000], np.uint8).reshape(-1, 3072)
    for name in ("sha256", "md5"):
        t = time.perf_counter()
        for row in rows:
            hashlib.new(name, row).digest()
        out[f"{name}_3kB_rows_mb_s"] = rows.nbytes / 1e6 / (time.perf_counter() - t)
    return out


def cast_rates(values: int = 1 << 19, times: int = 64) -> dict[str, float]:
    """MB/s (of float32) of float16 <-> float32 casts of 2 MB blocks, in CPU time: numpy's, and
    torch's copy in pieces of its grain size in one thread (as `import_features._cast_into` does)."""
    import torch

    half = np.random.default_rng(2).standard_normal(values).astype(np.float16)
    wide = half.astype(np.float32)

    def pieces(out: np.ndarray, source: np.ndarray) -> None:
        for a, b in zip(torch.from_numpy(out).split(32768), torch.from_numpy(source).split(32768), strict=True):
            a.copy_(b)

    out = {}
    for name, cast in (("numpy", np.copyto), ("torch", pieces)):
        for direction, target, source in (("f16_f32", np.empty_like(wide), half),
                                          ("f32_f16", np.empty_like(half), wide)):
            cast(target, source)
            cpu = time.process_time()
            for _ in range(times):
                cast(target, source)
            out[f"cast_{direction}_{name}_mb_s"] = times * wide.nbytes / 1e6 / (time.process_time() - cpu)
    return out


def writer_rates(directory: Path, rows: int = 163_840, dim: int = 768) -> dict[str, float]:
    """MB/s of vector bytes one embeddings shard is written at (fsync'd): `write_parquet` as it is,
    and pyarrow's writer with the options `write_parquet` used before `parquet_vectors`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.store.atomic import VECTOR_GROUP_ROWS, atomic_write, write_parquet
    from schemas import embeddings_schema

    vectors = np.random.default_rng(1).standard_normal((rows, dim)).astype(np.float16)
    schema = embeddings_schema(dim)
    table = pa.Table.from_arrays([
        pa.array(["m"] * rows), pa.array(["image"] * rows), pa.array([f"{i:064x}" for i in range(rows)]),
        pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), type=schema.field("vector").type),
        pa.array(np.ones(rows, np.float32)),
    ], schema=schema)
    others = ["model_key", "modality", "content_hash", "norm"]
    out = {}
    for name, write in (
        ("write_parquet", lambda p: write_parquet(table, p)),
        ("pyarrow_before", lambda p: atomic_write(p, lambda tmp: pq.write_table(
            table, tmp, compression={**{o: "zstd" for o in others}, "vector": "none"}, write_page_checksum=True,
            use_dictionary=others, write_statistics=others, row_group_size=VECTOR_GROUP_ROWS,
            data_page_size=1 << 30, max_rows_per_page=VECTOR_GROUP_ROWS))),
    ):
        t, cpu = time.perf_counter(), time.process_time()
        write(directory / f"{name}.parquet")
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        out[f"{name}_mb_s"] = vectors.nbytes / 1e6 / seconds
        out[f"{name}_cpu_s"] = cpu
        (directory / f"{name}.parquet").unlink()
    return out


def import_once(tree: Path, sources: Path, store_dir: Path) -> dict[str, object]:
    """Run the stage of `tree` over `sources` into a new store, in a child process."""
    shutil.rmtree(store_dir, ignore_errors=True)
    code = (
        "import json, time, resource\n"
        "from pathlib import Path\n"
        "from pipeline.allocator import fix_mmap_threshold\n"
        "from pipeline.stages.import_features import ImportConfig, run\n"
        "from pipeline.store.layout import Store\n"
        "fix_mmap_threshold()\n"
        "t = time.perf_counter()\n"
        f"r = run(ImportConfig(Path({str(sources)!r}), 'h5', Store(Path({str(store_dir)!r})), 'bench'))\n"
        "u = resource.getrusage(resource.RUSAGE_SELF)\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(json.dumps({'seconds': time.perf_counter() - t, 'cpu_s': u.ru_utime + u.ru_stime,\n"
        "                  'user_s': u.ru_utime, 'sys_s': u.ru_stime, 'peak_rss_mb': int(hwm) / 1024,\n"
        "                  'samples': r.samples_added, 'vectors': r.vectors_added}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tree, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    vector_bytes = sum(p.stat().st_size for p in (store_dir / "embeddings").rglob("*.parquet"))
    result["embeddings_gb"] = vector_bytes / 1e9
    result["embeddings_mb_s"] = vector_bytes / 1e6 / result["seconds"]
    result["source_mb_s"] = sum(p.stat().st_size for p in sources.glob("*.h5")) / 1e6 / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="samples (a multiple of 5)")
    parser.add_argument("--sources", type=Path, help="keep the HDF5 sources here (made when absent)")
    parser.add_argument("--tree", type=Path, action="append", help="a code tree to import with (repeatable)")
    parser.add_argument("--floor", action="store_true", help="measure the disk, copy and hash rates first")
    parser.add_argument("--repeat", type=int, default=1, help="imports per tree (alternating trees)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-import-", dir=args.sources.parent if args.sources else None))
    sources = args.sources or base / "h5"
    try:
        if args.floor:
            print(json.dumps({"floor": floor(base)}), flush=True)
            print(json.dumps({"writers": writer_rates(base)}), flush=True)
        if not sources.exists():
            t = time.perf_counter()
            write_sources(sources, args.rows // 5)
            print(f"{args.rows:,} samples written as HDF5 in {time.perf_counter() - t:.0f} s", flush=True)
        for _ in range(args.repeat):
            for tree in args.tree or [ROOT]:
                r = import_once(tree.resolve(), sources, base / "store")
                print(json.dumps({"tree": str(tree), "rows": args.rows, **r}), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
