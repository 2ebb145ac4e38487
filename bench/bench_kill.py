"""SIGKILL soak: kill ingest, encode (2 decoding workers), train, sweep (2 worker processes), index
build, report, predict and catalog rebuild at random moments, rerun, and check the store against an
uninterrupted run: nothing lost, nothing doubled, vectors and scores bit-identical, no temp file left,
and no process of the killed one left running (its workers must die with it).

    python bench/bench_kill.py --kills 20 [--stages ingest,encode,train,sweep,index,report,predict,rebuild] [--seed 0]

Each stage runs in a child process on a copy of a tiny store made just before that stage. The child
imports everything, prints START, and runs the stage; the parent kills it (alone: its workers are
not signalled) with SIGKILL after a random delay drawn over the stage's measured working time (so
kills land in the work, not in imports), counts the killed child's descendants still running 5 s
later, then reruns the stage to completion in a fresh child and compares. Not a test: it takes minutes.
A new stage is one entry in RUNNERS and its place in STAGES. Predict (`--keep`, `--output` beside the
store) is checked for its store rows and for its output file: whole, every image once, no temp left.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.children import alive, descendants  # noqa: E402 - this tree's pipeline

CHILD = r"""
import sys, json
from pathlib import Path
PREDICTIONS = lambda root: root.parent / f"{root.name}-predictions.parquet"
stage, store_dir, parquet, real = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
from pipeline.store.layout import Store
store = Store(store_dir)
exec(RUNNERS[stage])  # defines run()
print("START", flush=True)
run()
print("DONE", flush=True)
"""
# Each stage's code for the child: it defines `run()` (imports and setup are done before START).
RUNNERS = {
    "ingest": """
from pipeline.stages import ingest
cfg = ingest.IngestConfig(parquet, "d3", store, real_images=real, shard_rows=8)
run = lambda: ingest.run(cfg)
""",
    "encode": """
from pipeline.encoding.clip import ModelSpec
from pipeline.stages import encode
cfg = encode.EncodeConfig(store, ModelSpec("Tiny-ViT-16"), workers=2, batch_size=4, shard_rows=8)
run = lambda: encode.run(cfg)
""",
    "train": """
from pipeline.runs.config import TrainConfig
from pipeline.stages import train
cfg = train.TrainJob(store, TrainConfig.from_dict({"epochs": 2, "batch_size": 16}), skip_existing=True)
run = lambda: train.run(cfg)
""",
    "sweep": """
from pipeline.compositions import sweep
points = tuple(sweep.SweepPoint({"epochs": 3, "batch_size": 16, "seed": s}, {"seed": s}) for s in (1, 2, 3))
cfg = sweep.SweepConfig(store, points, jobs=2)
run = lambda: sweep.run(cfg)
""",
    "index": """
from pipeline.stages import index
cfg = index.IndexConfig(store)
run = lambda: index.run(cfg)
""",
    "report": """
from pipeline.stages import report
from pipeline.store import catalog
run_id = catalog.query(store, "SELECT min(run_id) FROM runs").column(0)[0].as_py()
cfg = report.ReportConfig(store, run_id)
run = lambda: report.run(cfg)
""",
    "rebuild": """
from pipeline.store import writes
run = lambda: writes.rebuild(store)
""",
    # new images (made once, beside the stores, folder renamed into place whole), predicted with --keep
    # (vectors and unlabelled samples into the store) and --output (a file outside it, published whole)
    "predict": """
import os, shutil, numpy as np
from pipeline.stages import predict
from pipeline.store import catalog
from pipeline.synthetic import generated_image, real_image
new = store.root.parent / "predict-images"
if not new.exists():
    tmp = store.root.parent / f".predict-images-{os.getpid()}"
    tmp.mkdir()
    rng = np.random.default_rng(7)
    for i in range(24):
        (real_image(rng, 32) if i % 2 else generated_image(rng, i % 4, 32)).save(tmp / f"new{i:02d}.jpg")
    os.rename(tmp, new)
run_id = catalog.query(store, "SELECT min(run_id) FROM runs").column(0)[0].as_py()
cfg = predict.PredictConfig((new,), store, run_id, output=PREDICTIONS(store.root), caption="a photo", keep=True,
                            workers=2, batch_size=4)
run = lambda: predict.run(cfg)
""",
}
STAGES = ("ingest", "encode", "train", "sweep", "index", "report", "predict", "rebuild")


def PREDICTIONS(store_dir: Path) -> Path:  # noqa: N802 - (a name the child's code reads as a constant)
    """Where the predict stage writes its rows: beside the store, outside it."""
    return store_dir.parent / f"{store_dir.name}-predictions.parquet"


def child(stage: str, store: Path, src: tuple[Path, Path]) -> subprocess.Popen[str]:
    code = f"RUNNERS = {RUNNERS!r}\n{CHILD}"
    return subprocess.Popen([sys.executable, "-c", code, stage, str(store), *map(str, src)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def run_to_end(stage: str, store: Path, src: tuple[Path, Path]) -> float:
    """Run a stage in a child to completion; seconds from START to DONE."""
    p = child(stage, store, src)
    assert p.stdout is not None
    line = p.stdout.readline()
    t0 = time.monotonic()
    out, err = p.communicate()
    if p.returncode != 0 or "DONE" not in out:
        raise SystemExit(f"{stage} failed ({p.returncode}): {line}{out}\n{err[-3000:]}")
    return time.monotonic() - t0


def kill_at_random(stage: str, store: Path, src: tuple[Path, Path], delay: float) -> tuple[bool, int]:
    """Start the stage, SIGKILL it alone `delay` s after START; (whether it was still running then, how
    many of its descendants still run 5 s after the kill: they are then killed too)."""
    p = child(stage, store, src)
    assert p.stdout is not None
    p.stdout.readline()  # START
    family: set[int] = set()
    until = time.monotonic() + delay
    while time.monotonic() < until and p.poll() is None:
        family |= descendants(p.pid)
        time.sleep(0.05)
    family |= descendants(p.pid)
    mid_run = p.poll() is None
    p.send_signal(signal.SIGKILL)
    p.communicate()
    time.sleep(5)
    left = [q for q in family if alive(q)]
    for q in left:
        os.kill(q, signal.SIGKILL)
    return mid_run, len(left)


def snapshot(store_dir: Path) -> dict[str, object]:
    """Counts, duplicates and a digest of every vector and score: what must match the reference."""
    from pipeline.store import catalog
    from pipeline.store.layout import Store

    store = Store(store_dir)

    def one(sql: str) -> object:
        return catalog.query(store, sql).to_pylist()[0]

    snap: dict[str, object] = {
        "samples": one("SELECT count(*) AS n, count(*) - count(DISTINCT sample_id) AS doubled FROM samples"),
        "quarantine": one("SELECT count(*) AS n, count(*) - count(DISTINCT (reason, source_uri, "
                          "source_member, source_row)) AS doubled FROM quarantine"),
        "embeddings": one("SELECT count(*) AS n, count(*) - count(DISTINCT (model_key, modality, content_hash)) "
                          "AS doubled FROM embeddings"),
        "runs": one("SELECT count(*) AS n, count(*) - count(DISTINCT config_hash) AS doubled FROM runs"),
        "scores": one("SELECT count(*) AS n, count(*) - count(DISTINCT (run_id, sample_id)) AS doubled, "
                      "count(*) FILTER (WHERE run_id NOT IN (SELECT run_id FROM runs)) AS orphans FROM scores"),
        "indexes": one("SELECT count(*) AS n, count(*) - count(DISTINCT index_id) AS doubled FROM indexes"),
    }
    vectors = catalog.query(store, "SELECT modality, content_hash, vector FROM embeddings ORDER BY 1, 2")
    snap["vector_digest"] = hashlib.sha256(json.dumps(vectors.to_pylist()).encode()).hexdigest()[:16]
    # runs are named by time: order by what they are (their config) so that reruns compare equal
    scores = catalog.query(store, "SELECT r.config_hash, s.sample_id, s.score FROM scores s JOIN runs r "
                           "USING (run_id) ORDER BY 1, 2")
    snap["score_digest"] = hashlib.sha256(json.dumps(scores.to_pylist()).encode()).hexdigest()[:16]
    predictions = PREDICTIONS(store_dir)
    if predictions.exists():  # predict's output, outside the store: whole, every image once
        import pyarrow.parquet as pq

        rows = pq.read_table(predictions, columns=["path", "sha256", "score"]).to_pylist()
        rows = sorted((Path(r["path"]).name, r["sha256"], r["score"]) for r in rows)
        snap["prediction_digest"] = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
    leftovers = sorted(str(p.parent.relative_to(store_dir)) for p in store_dir.rglob(".*.tmp"))
    leftovers += [p.name for p in store_dir.parent.glob(f".{predictions.name}*")]  # its temp, beside it
    snap["temps_left"] = ",".join(leftovers) or 0  # folders holding a leftover temp (a dead writer's)
    return snap


def compare(ref: dict[str, object], got: dict[str, object]) -> tuple[int, int, list[str]]:
    """(rows lost, rows doubled, other differences)."""
    lost = doubled = 0
    diffs = []
    for key in ("samples", "quarantine", "embeddings", "runs", "scores", "indexes"):
        r, g = ref[key], got[key]
        assert isinstance(r, dict) and isinstance(g, dict)
        lost += max(0, r["n"] - g["n"])
        doubled += g["doubled"] + max(0, g["n"] - r["n"]) + g.get("orphans", 0)
    for key in ("vector_digest", "score_digest", "prediction_digest", "temps_left"):
        if ref.get(key) != got.get(key):
            diffs.append(f"{key}: {ref[key]} → {got[key]}")
    return lost, doubled, diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=6, help="D3 rows of the tiny source (5 images each)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    from pipeline.synthetic import make_d3

    work = Path(tempfile.mkdtemp(prefix="bench-kill-"))
    data = make_d3(work / "src", rows=args.rows, size=32)
    src = (data.parquet, data.real_images)
    # reference chain: one uninterrupted run of every stage, keeping the store before each
    before: dict[str, Path] = {}
    ref_store = work / "ref"
    timings: dict[str, float] = {}
    for stage in STAGES:
        before[stage] = work / f"before-{stage}"
        if ref_store.exists():
            shutil.copytree(ref_store, before[stage])
        timings[stage] = run_to_end(stage, ref_store, src)
    reference: dict[str, dict[str, object]] = {}
    for stage in STAGES:  # the reference after each stage alone, from that stage's starting store
        done = work / f"ref-{stage}"
        if before[stage].exists():
            shutil.copytree(before[stage], done)
        run_to_end(stage, done, src)
        reference[stage] = snapshot(done)
    print(f"work dir {work}; stage working times (s): " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    print(f"{'stage':8} {'kills':>5} {'mid-run':>7} {'survived':>8} {'lost':>5} {'doubled':>7} {'orphans':>7}  other")
    total = {"kills": 0, "lost": 0, "doubled": 0, "orphans": 0}
    for stage in args.stages.split(","):
        killed_mid = survived = lost = doubled = orphans = 0
        other: list[str] = []
        for i in range(args.kills):
            store = work / f"kill-{stage}-{i}"
            if before[stage].exists():
                shutil.copytree(before[stage], store)
            delay = rng.uniform(0, timings[stage] * 1.1)
            mid, left = kill_at_random(stage, store, src, delay)
            killed_mid += mid
            orphans += left
            if not mid:  # it had finished: the box is faster now than when timed, aim earlier
                timings[stage] = max(0.2, 0.8 * delay)
            if stage == "rebuild":  # the store must read at once, before anything repairs it
                try:
                    snapshot(store)
                except Exception as exc:  # noqa: BLE001 - any failure to read is a finding
                    other.append(f"kill {i}: unreadable after kill: {exc}")
            run_to_end(stage, store, src)
            lo, do, diffs = compare(reference[stage], snapshot(store))
            lost += lo
            doubled += do
            other.extend(f"kill {i} at {delay:.2f}s: {d}" for d in diffs)
            survived += lo == 0 and do == 0 and not diffs and not left
            shutil.rmtree(store, ignore_errors=True)
        total["kills"] += args.kills
        total["lost"] += lost
        total["doubled"] += doubled
        total["orphans"] += orphans
        print(f"{stage:8} {args.kills:5d} {killed_mid:7d} {survived:8d} {lost:5d} {doubled:7d} {orphans:7d}  "
              f"{'; '.join(other[:3]) or '-'}", flush=True)
    print(f"total: {total['kills']} kills, {total['lost']} rows lost, {total['doubled']} rows doubled, "
          f"{total['orphans']} processes left running after their parent's kill")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
