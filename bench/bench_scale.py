"""Benchmark: every stage on a D3-shaped store of N samples, with wall time and peak memory.

The store is made the way a user would make it: HDF5 files in the reference code's layout
(each row one real image and four generated ones sharing a prompt; 768-d image and text vectors,
like ViT-L-14), brought in by `import-features`. The vectors are weakly informative (generated
images shifted a little along one direction, prompts along another), so AUC is neither 0.5 nor 1.
Each stage then runs in its own process, so its peak memory is its own:

    import, import again (the same files: skipped unread), status, sql (aggregate, point), view
    (the training view, built once), train (a fixed number of steps on the view), train again (the
    same config: found, nothing recomputed), sweep (3 configs), score (after importing 500 new
    samples), the newest run's scores by generator (written with a subquery on `scores`, then
    through `latest_scores`), index build (default 4 GB budget; `index rebuild` builds it again on a
    kept store, as `view rebuild` does the training view), leaks, neighbours, report, and a no-op
    encode on a store that also holds real image samples.

Peak RSS is the kernel's high-water mark (it counts pages of the memory-mapped vectors the stage
touched, which the kernel can drop at will); peak anon is sampled anonymous memory (what the
process itself holds). The detector is a small MLP (hidden 256) so the bookkeeping, not the model,
is what is measured.

    python bench/bench_scale.py --rows 1000000 --out bench-1m.json [--keep DIR]
    python bench/bench_scale.py --compare bench-1m.json bench-5m.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DIM = 768
KEY = "bench"
FILE_ROWS = 20_000  # D3 rows per HDF5 file (5 samples each)
CENTRES = 2000
STEPS = 50
TRAIN = {"model_key": KEY, "epochs": 1, "steps_per_epoch": STEPS, "hidden": 256, "batch_size": 2048}
STAGES = ("import", "import again", "status", "sql aggregate", "sql point", "view", "train", "train again", "sweep",
          "score", "sql latest by subquery", "sql latest_scores", "index build", "leaks", "neighbours", "report",
          "encode no-op")
# the newest run's test scores by generator: as people write it (every run's files are read where the
# filter is not pushed down), and through the `latest_scores` view (the newest run's files only)
LATEST = ("SELECT generator, count(*) AS n, avg(score) AS mean FROM {} WHERE split = 'test' {}GROUP BY ALL")
SUBQUERY = "AND run_id = (SELECT run_id FROM runs ORDER BY created_at DESC LIMIT 1) "
ON_REQUEST = ("index rebuild", "view rebuild")  # run only when --stages names them
INDEX_OPTIONS: dict[str, Any] = {}  # `index rebuild`'s --index-kind and --index-memory
INDEX_FLAGS: list[str] = []  # the same, passed on to the stage's process


# --- the store ------------------------------------------------------------------------------


def write_sources(directory: Path, rows: int, seed: int = 0, first_file: int = 0) -> list[Path]:
    """HDF5 files of `rows` D3 rows (5·rows samples), float16 to halve the disk they take."""
    import h5py

    rng = np.random.default_rng(seed)
    image_dir = np.random.default_rng(99).normal(size=DIM)
    text_dir = np.random.default_rng(98).normal(size=DIM)
    image_dir, text_dir = image_dir / np.linalg.norm(image_dir), text_dir / np.linalg.norm(text_dir)
    # embeddings cluster (by subject); a store of isotropic noise would make every IVF index useless
    centres = np.random.default_rng(97).normal(size=(CENTRES, DIM)).astype(np.float32) * 2.0
    directory.mkdir(parents=True, exist_ok=True)
    files = []

    def draw(n: int, shift: np.ndarray | float = 0.0) -> np.ndarray:
        around = centres[rng.integers(0, CENTRES, n)]
        return (around + rng.standard_normal((n, DIM), np.float32) + shift).astype(np.float16)

    for k, start in enumerate(range(0, rows, FILE_ROWS)):
        n = min(FILE_ROWS, rows - start)
        path = directory / f"{first_file + k:04d}.h5"
        with h5py.File(path, "w") as f:
            f["real"] = draw(n)
            for g in range(4):
                f[f"image_gen{g}"] = draw(n, 3.0 * image_dir)
            f["original_prompt"] = draw(n)
            f["positive_prompt"] = draw(n, 1.5 * text_dir)
        files.append(path)
    return files


# --- one stage, in its own process ------------------------------------------------------------


def run_stage(stage: str, store_dir: Path, work: Path) -> dict[str, Any]:
    from pipeline.store.layout import Store

    store = Store(store_dir)
    if stage in ("import", "import again"):  # again: the same files, unchanged (nothing to read)
        from pipeline.stages.import_features import ImportConfig, run

        result = run(ImportConfig(work / "h5", "h5", store, KEY))
        return {"samples": result.samples_added, "vectors": result.vectors_added}
    if stage == "status":
        from pipeline.stages.status import StatusConfig, run

        return {"samples": run(StatusConfig(store)).samples}
    if stage.startswith("sql"):
        from pipeline.stages.sql import SqlConfig, run

        if stage == "sql aggregate":
            sql = "SELECT split, label, generator, count(*) AS n FROM samples GROUP BY ALL"
        elif stage == "sql latest by subquery":
            sql = LATEST.format("scores", SUBQUERY)
        elif stage == "sql latest_scores":
            sql = LATEST.format("latest_scores", "")
        else:
            sid = json.loads((work / "probe.json").read_text())["sample_id"]
            sql = f"SELECT sample_id, split, label, generator FROM samples WHERE sample_id = '{sid}'"
        return {"rows": run(SqlConfig(store, sql)).rows}
    if stage in ("view", "view rebuild"):  # rebuild: the view of a kept store dropped and built again, whole
        from pipeline.features.view import feature_table

        if stage == "view rebuild":
            shutil.rmtree(store_dir / "cache" / "views" / KEY, ignore_errors=True)
        table = feature_table(store, KEY)
        return {"rows": table.rows, "parts": len(table.parts), **({"retries": table.retries} if table.retries else {})}
    if stage.startswith("train"):
        from pipeline.runs.config import TrainConfig
        from pipeline.stages.train import TrainJob, run

        result = run(TrainJob(store, TrainConfig.from_dict(TRAIN), skip_existing=True))
        (work / "run.json").write_text(json.dumps({"run_id": result.run_id}))
        return {"skipped": result.skipped, "test_auc": result.metrics.test.auc}
    if stage == "sweep":
        from pipeline.compositions.sweep import SweepConfig, SweepPoint, run

        points = tuple(SweepPoint({**TRAIN, "seed": s, "steps_per_epoch": 20}, {"seed": s}) for s in (1, 2, 3))
        result = run(SweepConfig(store, points))
        return {"runs": len(result.rows), "test_auc": [r.test_auc for r in result.rows]}
    if stage == "score":
        from pipeline.stages.import_features import ImportConfig
        from pipeline.stages.import_features import run as import_features
        from pipeline.stages.score import ScoreConfig, run

        write_sources(work / "new", 100, seed=7, first_file=9000)
        added = import_features(ImportConfig(work / "new", "h5", store, KEY)).samples_added
        result = run(ScoreConfig(store, json.loads((work / "run.json").read_text())["run_id"]))
        return {"new_samples": added, "scored": result.scored, "already": result.already_scored}
    if stage in ("index build", "index rebuild"):  # rebuild: even where these vectors have one (--keep stores)
        from pipeline.features.ann.build import IndexConfig
        from pipeline.stages.index import run

        if stage == "index rebuild":  # the vectors in page cache first (`warm_vectors`), one FAISS thread
            config = IndexConfig(store, KEY, force=True, threads=1, **INDEX_OPTIONS)
        else:
            config = IndexConfig(store, KEY)
        info = run(config)
        return {"kind": info.kind, "factory": info.params.get("factory"), "recall_at_10": info.recall_at_10,
                "nprobe": info.params.get("nprobe"), "rerank": info.params.get("rerank")}
    if stage == "leaks":
        from pipeline.stages.leaks import LeakConfig, run

        result = run(LeakConfig(store, KEY))
        return {"queries": result.queries, "pairs": result.pairs.num_rows, "index": result.index_kind}
    if stage == "neighbours":
        from pipeline.stages.neighbors import NeighborQuery, run

        sid = json.loads((work / "probe.json").read_text())["sample_id"]
        result = run(NeighborQuery(store, sample_id=sid, k=10, model_key=KEY))
        return {"rows": result.rows.num_rows, "index": result.index_kind, "note": result.note}
    if stage == "report":
        from pipeline.stages.report import ReportConfig, run

        result = run(ReportConfig(store, json.loads((work / "run.json").read_text())["run_id"],
                                  output=work / "report"))
        return {"files": len(result.files)}
    if stage == "encode no-op":
        from pipeline.encoding.clip import ModelSpec
        from pipeline.stages.encode import EncodeConfig, run

        result = run(EncodeConfig(store, ModelSpec("Tiny-ViT-16"), workers=0))
        return {"encoded": getattr(result, "images_encoded", None)}
    raise SystemExit(f"unknown stage {stage!r}")


def warm_vectors(store_dir: Path) -> None:
    """Every vector file read once into the page cache, before the timed work: `index rebuild` then
    measures the build, not the disk. Its CPU then compares across sizes and runs (one FAISS
    thread: two spin against each other on a shared box, see `coarse.faiss_threads`); a cold
    cache adds the kernel's reads (measured: 30-40 CPU-s of system time at 5M)."""
    for path in sorted((store_dir / "embeddings").rglob("image-*.parquet")) + sorted(
            (store_dir / "cache" / "vectors").rglob("*.npy")):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def _status_kb(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KB (0 where there is none)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


def _anon_kb() -> int:
    return _status_kb("RssAnon")


def _hwm_kb() -> int:
    return _status_kb("VmHWM")


def worker(stage: str, store_dir: Path, work: Path) -> None:
    from pipeline.allocator import fix_mmap_threshold

    fix_mmap_threshold()  # as the CLI does
    peak = [_anon_kb()]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], _anon_kb())
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    if stage == "index rebuild":
        warm_vectors(store_dir)  # untimed
    started, cpu = time.perf_counter(), time.process_time()
    info = run_stage(stage, store_dir, work)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    peak[0] = max(peak[0], _anon_kb())
    print(json.dumps({"stage": stage, "seconds": seconds, "cpu_s": cpu, "peak_rss_mb": _hwm_kb() / 1024,
                      "peak_anon_mb": peak[0] / 1024, **info}, default=str))


def in_process(stage: str, store_dir: Path, work: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", stage, "--store", str(store_dir), "--work", str(work), *INDEX_FLAGS]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"stage": stage, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- driver ---------------------------------------------------------------------------------


def prepare_images(store_dir: Path, work: Path) -> None:
    """A few real JPEGs ingested and encoded once, so the timed encode has nothing to do."""
    import io

    from PIL import Image

    from pipeline.encoding.clip import ModelSpec
    from pipeline.stages.encode import EncodeConfig
    from pipeline.stages.encode import run as encode
    from pipeline.stages.ingest import IngestConfig
    from pipeline.stages.ingest import run as ingest
    from pipeline.store.layout import Store

    folder = work / "images" / "real"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(24):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
        (folder / f"{i}.jpg").write_bytes(buf.getvalue())
    store = Store(store_dir)
    ingest(IngestConfig(work / "images", "folder", store))
    encode(EncodeConfig(store, ModelSpec("Tiny-ViT-16"), workers=0))


def probe(store_dir: Path, work: Path) -> None:
    from pipeline.store import catalog
    from pipeline.store.layout import Store

    sid = catalog.query(Store(store_dir), "SELECT sample_id FROM samples WHERE split = 'test' "
                        "AND source_format = 'features:h5' LIMIT 1").column(0)[0].as_py()
    (work / "probe.json").write_text(json.dumps({"sample_id": sid}))


def du_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def bench(rows: int, out: Path | None, keep: Path | None, stages: tuple[str, ...] = STAGES) -> list[dict[str, Any]]:
    base = keep or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work, store_dir = base / "work", base / "store"
    if "import" in stages:
        shutil.rmtree(store_dir, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        write_sources(work / "h5", rows // 5)
        print(f"{rows:,} samples written as HDF5 in {time.perf_counter() - t:.0f} s "
              f"({du_gb(work / 'h5'):.1f} GB)", flush=True)
    results = []
    for stage in stages:
        if stage == "status" and (work / "h5").exists():
            shutil.rmtree(work / "h5")  # imported: free the disk for the larger stores
            probe(store_dir, work)
        if stage == "encode no-op" and not (work / "images").exists():
            prepare_images(store_dir, work)
        r = in_process(stage, store_dir, work)
        results.append(r)
        extra = {k: v for k, v in r.items() if k not in ("stage", "seconds", "cpu_s", "peak_rss_mb", "peak_anon_mb")}
        if "error" in r:
            print(f"{stage:<14} ERROR {r['error']}", flush=True)
        else:
            print(f"{stage:<14} {r['seconds']:8.1f} s (cpu {r['cpu_s']:7.1f} s)  peak RSS {r['peak_rss_mb']:7.0f} MB  "
                  f"anon {r['peak_anon_mb']:6.0f} MB  {extra}", flush=True)
    disk = {d.name: round(du_gb(d), 2) for d in sorted(store_dir.iterdir()) if d.is_dir()}
    disk["cache/vectors"] = round(du_gb(store_dir / "cache" / "vectors"), 2)
    disk["cache/views"] = round(du_gb(store_dir / "cache" / "views"), 2)
    print(f"disk (GB): {disk}")
    if out:
        out.write_text(json.dumps({"rows": rows, "stages": results, "disk_gb": disk}, indent=1, default=str))
    if keep is None:
        shutil.rmtree(base, ignore_errors=True)
    return results


def compare(a: Path, b: Path) -> None:
    small, large = json.loads(a.read_text()), json.loads(b.read_text())
    ratio = large["rows"] / small["rows"]
    print(f"{small['rows']:,} → {large['rows']:,} samples (×{ratio:g}; linear time would be ×{ratio:g})")
    doublings = math.log2(ratio)
    print(f"{'stage':<14} {'s small':>8} {'s large':>8} {'growth':>7} {'cpu growth':>10} {'per doubling':>12} "
          f"{'RSS MB':>14} {'anon MB':>14}")
    by_stage = {r["stage"]: r for r in small["stages"]}
    for r in large["stages"]:
        s = by_stage.get(r["stage"])
        if s is None or "error" in r or "error" in s:
            print(f"{r['stage']:<14} (failed)")
            continue
        growth = r["seconds"] / max(s["seconds"], 1e-9)
        cpu_growth = r.get("cpu_s", 0) / max(s.get("cpu_s", 0), 1e-9)
        per_doubling = cpu_growth ** (1 / doublings) if doublings > 0 and cpu_growth > 0 else float("nan")
        print(f"{r['stage']:<14} {s['seconds']:8.1f} {r['seconds']:8.1f} {growth:7.2f} {cpu_growth:10.2f} "
              f"{per_doubling:12.2f} "
              f"{s['peak_rss_mb']:6.0f}→{r['peak_rss_mb']:<6.0f} {s['peak_anon_mb']:6.0f}→{r['peak_anon_mb']:<6.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="samples (a multiple of 5)")
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    parser.add_argument("--keep", type=Path, help="build the store here and keep it")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("SMALL", "LARGE"))
    parser.add_argument("--stages", help="comma-separated subset to run again on a --keep store "
                        f"(default: all, from import): {', '.join(STAGES)}; or {', '.join(ON_REQUEST)}")
    parser.add_argument("--index-kind", help="index rebuild: this kind (ivf-sq8, ivf-pq, ...) instead of auto")
    parser.add_argument("--index-memory", help="index rebuild: this budget (e.g. 8GB) instead of 4GB")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.index_kind:
        INDEX_OPTIONS["kind"] = args.index_kind
        INDEX_FLAGS.extend(["--index-kind", args.index_kind])
    if args.index_memory:
        from pipeline.features.ann.plan import parse_memory

        INDEX_OPTIONS["max_memory"] = parse_memory(args.index_memory)
        INDEX_FLAGS.extend(["--index-memory", args.index_memory])
    if args.worker:
        worker(args.worker, args.store, args.work)
    elif args.compare:
        compare(*args.compare)
    else:
        stages = STAGES if not args.stages else tuple(x.strip() for x in args.stages.split(","))
        if unknown := set(stages) - set(STAGES) - set(ON_REQUEST):
            parser.error(f"unknown stage(s) {', '.join(sorted(unknown))}")
        if "import" not in stages and args.keep is None:
            parser.error("--stages without import needs --keep DIR (a store built before)")
        bench(args.rows, args.out, args.keep, stages)


if __name__ == "__main__":
    main()
