"""What checking D3's generator order costs (`pipeline.sources.d3_order`).

- `store`: the store aggregate (`stored_orders`, run once by a D3 ingest or h5 import that reads
  something) on a D3-shaped samples table of --rows D3 rows (5 samples each: four generated and one
  real; --webdataset of the rows in the webdataset form, with its long member names), against
  `SELECT count(*) FROM samples_all WHERE label = 1` (the cheapest pass over the same rows) and
  against opening the catalog alone (`SELECT 1`), alternating, in one process of its own.
- `tally`: ingesting a D3 Parquet file of --ingest-rows rows (four small images each) with the
  per-row order tally, against the same ingest with the tally switched off, alternating, each in
  its own process: the tally's share of an ingest's CPU. With --baseline CHECKOUT, the same ingest
  run from another checkout (e.g. main, before the order check), alternating: the whole change's cost.

    python bench/bench_d3_order.py --rows 2300000 --ingest-rows 20000 --work /tmp/bench_d3_order
    python bench/bench_d3_order.py --rows 0 --ingest-rows 20000 --repeats 7 --baseline /work/main

CPU seconds are the process's (every thread, `getrusage`); the machine may be shared, so compare
the ratios, not the seconds. The work folder is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("DeepFloyd/IF-I-M-v1.0", "stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-xl-base-1.0",
          "CompVis/stable-diffusion-v1-4")
NAMES = ("deepfloyd-if", "sd-2.1", "sd-xl", "sd-1.4")
CHUNK = 200_000  # D3 rows per samples shard written


def _cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def _peak_mb() -> float:
    """This process's own peak RSS (VmHWM; `ru_maxrss` would carry the forking parent's over exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def build_store(root: Path, rows: int, webdataset: float) -> None:
    """A store whose samples are --rows D3 rows, written a shard of `CHUNK` rows at a time."""
    from pipeline.reporting import Silent
    from pipeline.store import catalog
    from pipeline.store.atomic import write_parquet
    from pipeline.store.layout import Store
    from pipeline.store.lock import writing
    from schemas import SAMPLES, from_columns

    store = Store(root)
    rng = np.random.default_rng(0)
    now = datetime.now(UTC)
    with writing(store, Silent()):
        for start in range(0, rows, CHUNK):
            n = min(CHUNK, rows - start)
            raw = rng.bytes(32 * 5 * n)
            ids = pa.array([raw[i:i + 32].hex() for i in range(0, len(raw), 32)])
            row_ids = pa.array([str(1_000_000_000_000 + start + i) for i in range(n)])
            per_row = pa.array(np.repeat(np.arange(n), 5))
            slot = pa.array(np.tile(np.arange(5), n))
            wds = np.repeat(rng.random(n) < webdataset, 5)
            member_parquet = pa.array(["image_gen0", "image_gen1", "image_gen2", "image_gen3", "url"]).take(slot)
            member_wds = pc.binary_join_element_wise(
                "elsa_v2__train__", row_ids.take(per_row),
                pa.array([".gen_0.jpg", ".gen_1.jpg", ".gen_2.jpg", ".gen_3.jpg", ".real.jpg"]).take(slot), "")
            original = pc.if_else(pa.array(wds), pa.array(["gen_0", "gen_1", "gen_2", "gen_3", None]).take(slot),
                                  pa.array([*MODELS, None]).take(slot))
            table = from_columns(SAMPLES, {
                "sample_id": ids, "label": np.tile(np.array([1, 1, 1, 1, 0], np.int8), n),
                "generator": pa.array([*NAMES, "real"]).take(slot), "generator_original": original,
                "split": pa.array(["train"]).take(np.zeros(5 * n, np.int32)),
                "group_key": pc.binary_join_element_wise("d3:", row_ids, "").take(per_row),
                "text": pc.binary_join_element_wise("a prompt for row ", row_ids, "").take(per_row),
                "text_hash": ids, "source_format": pa.array(["d3"]).take(np.zeros(5 * n, np.int32)),
                "source_uri": pa.array([f"/d3/train-{start // CHUNK:05d}.parquet"]).take(np.zeros(5 * n, np.int32)),
                "source_member": pc.if_else(pa.array(wds), member_wds, member_parquet),
                "source_row": pa.array(np.repeat(np.arange(start, start + n), 5)),
                "ingested_at": pa.array([now], SAMPLES.field("ingested_at").type).take(np.zeros(5 * n, np.int32)),
            })
            catalog.commit(store, [write_parquet(table, store.new_shard(store.dataset_dir("samples"), "samples"))])


def measure_store(root: Path, repeats: int) -> dict[str, Any]:
    from pipeline.sources.d3_order import stored_orders
    from pipeline.store import catalog
    from pipeline.store.layout import Store

    store = Store(root)
    calls = {
        "open only": lambda: catalog.query(store, "SELECT 1"),
        "count": lambda: catalog.query(store, "SELECT count(*) FROM samples_all WHERE label = 1"),
        "stored_orders": lambda: stored_orders(store),
    }
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    wall: dict[str, list[float]] = {k: [] for k in calls}
    found = None
    for _ in range(repeats):
        for name, call in calls.items():
            c, w = _cpu(), time.perf_counter()
            out = call()
            cpu[name].append(_cpu() - c)
            wall[name].append(time.perf_counter() - w)
            if name == "stored_orders":
                found = out
    med = {k: statistics.median(v) for k, v in cpu.items()}
    return {"cpu_s": med, "wall_s": {k: statistics.median(v) for k, v in wall.items()},
            "orders_over_count_cpu": med["stored_orders"] / med["count"], "orders": found}


def peak_of(root: Path, call: str) -> dict[str, Any]:
    """Peak RSS of a process that makes one call: the count, or `stored_orders`."""
    from pipeline.sources.d3_order import stored_orders
    from pipeline.store import catalog
    from pipeline.store.layout import Store

    store = Store(root)
    if call == "count":
        catalog.query(store, "SELECT count(*) FROM samples_all WHERE label = 1")
    else:
        stored_orders(store)
    return {"peak_rss_mb": round(_peak_mb())}


def write_d3(path: Path, rows: int) -> None:
    rng = np.random.default_rng(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: dict[str, Any] = {
        "id": [str(i) for i in range(rows)],
        "original_prompt": [f"a photo {i}" for i in range(rows)],
        "positive_prompt": [f"a prompt {i}, highly detailed" for i in range(rows)],
        "url": [f"https://example.invalid/{i}.jpg" for i in range(rows)],
    }
    for k in range(4):
        raw = rng.bytes(256 * rows)  # hashed, never decoded, by ingest: any bytes will do
        columns[f"image_gen{k}"] = pa.array([{"bytes": raw[i:i + 256], "path": f"{i}_gen{k}.png"}
                                             for i in range(0, len(raw), 256)])
        columns[f"model_gen{k}"] = [MODELS[k]] * rows
    pq.write_table(pa.table(columns), path, row_group_size=4096)


def ingest_once(source: Path, store_dir: Path, tally: bool | None) -> dict[str, Any]:
    """One ingest; `tally` False switches the order tally off, None runs whatever checkout is imported."""
    from pipeline.stages.ingest import IngestConfig, run
    from pipeline.store.layout import Store

    if tally is False:
        from pipeline.sources import d3_order

        d3_order.OrderTally.add = lambda self, names, path: None  # type: ignore[method-assign]
    c = _cpu()
    result = run(IngestConfig(source, "d3", Store(store_dir)))
    return {"cpu_s": _cpu() - c, "added": result.added, "warnings": len(getattr(result, "generator_warnings", []))}


def _child(*args: str, checkout: Path = ROOT) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(checkout)}).stdout
    return json.loads(out.strip().splitlines()[-1])


def _compare(args: argparse.Namespace, other: str, checkout: Path) -> dict[str, Any]:
    """This checkout's ingest against `other` (a child mode, from `checkout`), alternating."""
    mine, theirs = [], []
    for _ in range(args.repeats):
        mine.append(_child("--child", "ingest", "--work", str(args.work)))
        theirs.append(_child("--child", other, "--work", str(args.work), checkout=checkout))
    cpu_mine, cpu_theirs = statistics.median(r["cpu_s"] for r in mine), statistics.median(r["cpu_s"] for r in theirs)
    return {"rows": args.ingest_rows, "cpu_s": cpu_mine, "cpu_s_other": cpu_theirs, "ratio": cpu_mine / cpu_theirs,
            "added": [mine[0]["added"], theirs[0]["added"]], "warnings": mine[0]["warnings"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_300_000, help="D3 rows of the store (5 samples each)")
    parser.add_argument("--webdataset", type=float, default=0.5, help="share of rows in the webdataset form")
    parser.add_argument("--ingest-rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_d3_order"))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--baseline", type=Path, help="another checkout to compare the Parquet ingest with")
    parser.add_argument("--child", choices=["store", "peak-count", "peak-orders", "ingest", "ingest-off",
                                            "ingest-plain"])
    args = parser.parse_args()
    if args.child == "store":
        print(json.dumps(measure_store(args.work / "store", args.repeats)))
        return
    if args.child in ("peak-count", "peak-orders"):
        print(json.dumps(peak_of(args.work / "store", args.child.removeprefix("peak-"))))
        return
    if args.child:
        shutil.rmtree(args.work / "ingest-store", ignore_errors=True)
        tally = {"ingest": True, "ingest-off": False, "ingest-plain": None}[args.child]
        print(json.dumps(ingest_once(args.work / "d3" / "train.parquet", args.work / "ingest-store", tally)))
        return
    shutil.rmtree(args.work, ignore_errors=True)
    try:
        if args.rows:
            c = time.perf_counter()
            build_store(args.work / "store", args.rows, args.webdataset)
            size = sum(p.stat().st_size for p in (args.work / "store" / "samples").glob("*.parquet"))
            print(json.dumps({"built": 5 * args.rows, "samples_mb": round(size / 2**20),
                              "s": round(time.perf_counter() - c)}))
            measured = _child("--child", "store", "--work", str(args.work), "--repeats", str(args.repeats))
            measured["peak_rss_mb"] = {call: _child("--child", f"peak-{call}", "--work", str(args.work))["peak_rss_mb"]
                                       for call in ("count", "orders")}
            print(json.dumps({"store": measured}, default=str))
        write_d3(args.work / "d3" / "train.parquet", args.ingest_rows)
        print(json.dumps({"tally": _compare(args, "ingest-off", ROOT)}))
        if args.baseline:
            print(json.dumps({"against " + str(args.baseline): _compare(args, "ingest-plain", args.baseline)}))
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
