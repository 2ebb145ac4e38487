"""Time what a run adds to be honest about its numbers: the row digests of the training view, the text
and format probes, and reading them back from the probe cache.

    python bench/bench_probes.py --store STORE [--model-key KEY] [--pairing as-ingested] [--cold]

On an existing store (e.g. `bench/bench_scale.py --rows 1000000 --keep DIR`, or the demo's). With
`--cold` the view of this model and pairing is deleted first, so its build (digests included) is timed;
then the digests alone are recomputed by one DuckDB query over the same rows, which is what the build
pays for them. Each step prints wall seconds, CPU seconds (this process, all threads) and the peak RSS
so far. Probes are computed uncached (their cache folder is moved aside and restored).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import duckdb

from pipeline.evaluation import probes
from pipeline.features.view import feature_table, resolve_model_key
from pipeline.store import duck
from pipeline.store.layout import Store


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(name: str, fn: Any) -> Any:
    wall, used = time.perf_counter(), cpu()
    out = fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{name:<34} {time.perf_counter() - wall:8.2f} s wall {cpu() - used:8.2f} s CPU   peak RSS {peak:7.0f} MB",
          flush=True)
    return out


def digest_query(table: Any, store: Store) -> tuple[int, int]:
    """Both digests of the view's rows, as the build computes them, by one query over the view and `samples`."""
    from pipeline.store import catalog

    with catalog.connect(store) as con:
        duck.limit_memory(con, "1GB", store.root / "cache" / "duckdb-tmp")
        what = "concat_ws('|', v.sample_id, v.label, v.split, v.generator, v.group_key)"
        return con.execute(
            f"SELECT bit_xor((md5_number({what}) >> 64)::UBIGINT), "
            f"bit_xor((md5_number(concat_ws('|', {what}, s.text_hash)) >> 64)::UBIGINT) "
            f"FROM {table.parts_sql} v JOIN (SELECT DISTINCT ON (sample_id) sample_id, text_hash FROM samples) s "
            "USING (sample_id)").fetchall()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--model-key")
    parser.add_argument("--pairing", default="as-ingested")
    parser.add_argument("--cold", action="store_true", help="delete this view first and time its build")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    store = Store(args.store)
    key = resolve_model_key(store, args.model_key)
    if args.cold:
        shutil.rmtree(store.root / "cache" / "views" / key / args.pairing, ignore_errors=True)
    table = timed("view (built if missing)", lambda: feature_table(store, key, args.pairing))
    print(f"  {table.rows:,} rows; {table.text_digest.rows:,} with a text vector")
    timed("digests alone (one query)", lambda: digest_query(table, store))
    cached = store.root / "cache" / "probes"
    aside = cached.with_name("probes.bench-aside")
    if cached.exists():
        cached.rename(aside)
    try:
        text = timed("text probe (uncached)", lambda: probes.text_probe(store, table, args.seed))
        fmt = timed("format probe (uncached)", lambda: probes.format_probe(store, table, args.seed))
        timed("checks, computed and cached", lambda: probes.checks(store, table, "image+text", args.seed, "l2"))
        timed("checks, from the cache", lambda: probes.checks(store, table, "image+text", args.seed, "l2"))
    finally:
        shutil.rmtree(cached, ignore_errors=True)
        if aside.exists():
            aside.rename(cached)
    if text.get("ran"):
        print(f"  text probe: test AUC {text['auc']['value']:.4f} [{text['auc']['lo']:.4f}, {text['auc']['hi']:.4f}] "
              f"on {text['train_rows']:,} train / {text['test_rows']:,} test rows")
    else:
        print(f"  text probe not run: {text.get('why')}")
    print(f"  format probe: {'read ' + str(fmt['read']) + ' files' if fmt.get('ran') else fmt.get('why')}")
    print(f"  DuckDB {duckdb.__version__}")


if __name__ == "__main__":
    main()
