"""What the store API costs: `import pipeline`, catalog.duckdb's store-relative views, `runs list|rm`,
`clean --dry-run`, and `runs rm` under SIGKILL.

    python bench/bench_store_api.py [--shards 3400] [--runs 1000] [--kills 20]

1. `import pipeline; from pipeline import Store` in a fresh interpreter: CPU seconds and modules, against
   `python -c pass` measured the same way (the floor).
2. A store of `--shards` tiny embedding shards (D3 at 4,096 vectors a shard: ~3,400): writing
   catalog.duckdb, and a query through it from another working directory, against the same query
   through views over absolute paths in the same process (the reference the relative paths must match).
3. A store of `--runs` synthetic runs (rows shaped like a real run's): `runs list`, `runs show`, and
   `runs rm` of one run, in CPU seconds, at a tenth of the runs and at all of them (how cost grows).
4. `clean --dry-run` on that store.
5. `--kills`: `runs rm` of a hundred runs at once (one commit) killed at random moments; after the next
   writer every run is whole or gone, and all of them the same (one commit), never half.
Timings are CPU seconds of this process (resource.getrusage), or of the child for imports; the box
may be shared, so compare the ratios printed, measured in one run.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child_cpu(code: str, repeat: int = 5) -> tuple[float, int]:
    """Median CPU seconds of a fresh interpreter running `code`, and the modules it ends with."""
    times, modules = [], 0
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([sys.executable, "-c", code + "; import sys; print(len(sys.modules))"],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        modules = int(out.split()[-1])
    return sorted(times)[len(times) // 2], modules


def bench_import() -> None:
    floor, floor_modules = child_cpu("pass")
    api, api_modules = child_cpu("import pipeline; from pipeline import Store; Store('x')")
    cli, cli_modules = child_cpu("import pipeline.cli")
    print(f"import: python alone {floor * 1000:.0f} ms CPU ({floor_modules} modules); `from pipeline import "
          f"Store` {api * 1000:.0f} ms ({api_modules} modules, +{(api - floor) * 1000:.0f} ms); "
          f"`import pipeline.cli` for comparison {cli * 1000:.0f} ms ({cli_modules} modules)")


def make_shards(root: Path, n: int) -> object:
    import pyarrow as pa

    from pipeline.store import writes
    from pipeline.store.atomic import write_parquet
    from pipeline.store.layout import Store
    from schemas import embeddings_schema, from_columns

    store = Store(root / "store")
    schema = embeddings_schema(4, "float16")
    paths = []
    with writes.writing(store):
        for i in range(n):
            modality = "image" if i % 5 else "text"
            table = from_columns(schema, {
                "model_key": pa.array(["m"]), "modality": pa.array([modality]),
                "content_hash": pa.array([f"{i:064x}"]),
                "vector": pa.array([[0.5, 0.5, 0.5, 0.5]], pa.list_(pa.float16(), 4)),
                "norm": pa.array([1.0], pa.float32())})
            paths.append(write_parquet(table, store.embeddings_dir("m") / f"{modality}-{i:08d}.parquet"))
        writes.commit(store, paths)
    return store


def bench_catalog_file(n: int) -> None:
    import duckdb

    from pipeline.store import catalog
    from pipeline.store.manifest import read_manifest

    with tempfile.TemporaryDirectory() as tmp:
        store = make_shards(Path(tmp), n)
        t = cpu()
        catalog.write_catalog_file(store)
        written = cpu() - t
        absolute = Path(tmp) / "absolute.duckdb"  # the reference: the same views over absolute paths
        with duckdb.connect(str(absolute)) as con:
            catalog._define_views(con, store, read_manifest(store), relative=False)
        query = "SELECT count(*), count(DISTINCT modality) FROM embeddings"
        os.chdir("/")
        timings = {}
        for name, path in (("relative (store_root())", store.catalog_path), ("absolute paths", absolute)):
            with duckdb.connect(str(path), read_only=True) as con:
                con.sql(query).fetchall()  # warm: the files' footers in the page cache
                t = cpu()
                for _ in range(3):
                    answer = con.sql(query).fetchall()
                timings[name] = (cpu() - t) / 3
            assert answer == [(n, 2)], answer
        os.chdir(ROOT)
        rel, ab = timings.values()
        print(f"catalog.duckdb, {n} shards: written in {written:.2f} s CPU; a query from another folder "
              f"{rel * 1000:.0f} ms CPU vs {ab * 1000:.0f} ms over absolute paths (ratio {rel / ab:.2f})")


def make_runs(root: Path, n: int, example: dict) -> object:
    import pyarrow as pa

    from pipeline.store import writes
    from pipeline.store.atomic import write_parquet, write_text
    from pipeline.store.layout import Store
    from schemas import METRICS, RUNS, SCORES, from_columns, from_rows

    store = Store(root)
    files = []
    with writes.writing(store):
        for i in range(n):
            run_id = f"20240101-{i:06d}-{i:08x}-beef"
            run_dir = store.run_dir(run_id)
            write_text(run_dir / "config.json", example["config_json"])
            write_text(run_dir / "metrics.json", example["metrics_json"])
            files.append(write_parquet(from_rows(RUNS, [{**example, "run_id": run_id, "name": f"r{i}",
                                                           "created_at": datetime.now(UTC)}]),
                                       run_dir / "run.parquet"))
            files.append(write_parquet(from_rows(METRICS, [{"run_id": run_id, "split": "test", "generator": "all",
                                                            "metric": "auc", "value": 0.5, "lo": 0.4, "hi": 0.6,
                                                            "n": 10}]),
                                       store.dataset_dir("metrics") / f"{run_id}.parquet"))
            files.append(write_parquet(from_columns(SCORES, {
                "run_id": pa.array([run_id] * 100), "sample_id": pa.array([f"{j:064x}" for j in range(100)]),
                "split": pa.array(["test"] * 100), "label": pa.array([j % 2 for j in range(100)], pa.int8()),
                "generator": pa.array(["g"] * 100), "score": pa.array([0.5] * 100, pa.float32())}),
                store.dataset_dir("scores") / f"{run_id}.parquet"))
        writes.commit(store, files)
    return store


def example_run() -> dict:
    """A real run's row (config and metrics JSON of the size training writes), trained on planted data."""
    from pipeline.api import Store as Api
    from tests.conftest import planted_store

    with tempfile.TemporaryDirectory() as tmp:
        api = Api(planted_store(Path(tmp), rows=60, dim=8, signal=4.0).root)
        run = api.train(features="image", epochs=2, batch_size=64, sam=False)
        row = api.sql(f"SELECT * FROM runs WHERE run_id = '{run.run_id}'").to_pylist()[0]
    return {k: v for k, v in row.items() if k not in ("run_id", "name", "created_at")}


def bench_runs(n: int, example: dict) -> None:
    from pipeline.stages import clean, runs

    for count in (max(1, n // 10), n):
        with tempfile.TemporaryDirectory() as tmp:
            store = make_runs(Path(tmp), count, example)
            t = cpu()
            listed = runs.run(runs.ListRuns(store))
            listing = cpu() - t
            t = cpu()
            runs.run(runs.ShowRun(store, listed.runs[0].run_id))
            showing = cpu() - t
            t = cpu()
            removed = runs.run(runs.RemoveRuns(store, (listed.runs[-1].run_id,)))
            removing = cpu() - t
            t = cpu()
            dry = clean.run(clean.CleanConfig(store, dry_run=True))
            cleaning = cpu() - t
            assert len(listed.runs) == count and removed.rows["scores"] == 100 and dry.files == 0
            print(f"{count:>5} runs ({3 * count} shards): runs list {listing * 1000:.0f} ms CPU, runs show "
                  f"{showing * 1000:.0f} ms, runs rm of one {removing * 1000:.0f} ms, clean --dry-run "
                  f"{cleaning * 1000:.0f} ms")


KILLED_RM = """
import sys
from pipeline.cli import app
print("START", flush=True)
app(["runs", "rm", *sys.argv[2:], "--store", sys.argv[1]], prog_name="pipeline")
"""


def bench_kills(kills: int, example: dict, seed: int) -> None:
    from pipeline.store import catalog
    from pipeline.store.writes import writing

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        template = make_runs(Path(tmp) / "template", 120, example)
        ids = [f"20240101-{i:06d}-{i:08x}-beef" for i in range(100)]
        proc = subprocess.Popen([sys.executable, "-c", KILLED_RM, str(template.root), *ids],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"START")
        t = time.monotonic()
        assert proc.wait() == 0
        work = time.monotonic() - t  # from its imports done to its exit: where the kills are drawn
        outcomes = {"whole": 0, "gone": 0}
        landed: dict[str, int] = {}
        for k in range(kills):
            store_dir = Path(tmp) / f"k{k}"
            shutil.rmtree(store_dir, ignore_errors=True)
            make_runs(store_dir, 120, example)
            proc = subprocess.Popen([sys.executable, "-c", KILLED_RM, str(store_dir), *ids],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
            assert proc.stdout is not None and proc.stdout.readline().startswith(b"START")
            started = time.monotonic()
            time.sleep(rng.uniform(0, work))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            alive_for = time.monotonic() - started
            from pipeline.store.layout import Store
            from pipeline.store.manifest import read_manifest

            store = Store(store_dir)
            journal = store.root / ".removing"
            committed = f"runs/{ids[0]}/run.parquet" not in read_manifest(store).shards
            where = ("inside rm, after its commit" if journal.exists() and any(journal.iterdir()) and committed
                     else "inside rm, before its commit" if journal.exists() and any(journal.iterdir())
                     else "after rm" if committed else "before rm")
            landed[where] = landed.get(where, 0) + 1
            with writing(store):  # the next writer finishes or forgets the removal
                pass
            rows = catalog.query(store, "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM scores), "
                                 "(SELECT count(*) FROM metrics)").to_pylist()[0]
            on_disk = sum(1 for i in ids if store.run_dir(i).exists())
            counts = tuple(rows.values())
            assert counts in ((120, 12000, 120), (20, 2000, 20)), counts  # all 100 whole, or all 100 gone
            assert on_disk == (100 if counts[0] == 120 else 0), on_disk
            assert not (store.root / ".removing").exists()
            outcomes["whole" if counts[0] == 120 else "gone"] += 1
            shutil.rmtree(store_dir)
            print(f"  kill {k + 1}: after {alive_for:.2f} s, {where} -> {'whole' if counts[0] == 120 else 'gone'}",
                  flush=True)
        print(f"runs rm of 100 runs (one commit; uninterrupted {work:.2f} s wall after its imports) killed "
              f"{kills} times: {outcomes['whole']} left all 100 whole, {outcomes['gone']} all 100 gone, 0 half; "
              f"the kills landed {', '.join(f'{n} {w}' for w, n in sorted(landed.items()))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=3400)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bench_import()
    bench_catalog_file(args.shards)
    example = example_run()
    bench_runs(args.runs, example)
    if args.kills:
        bench_kills(args.kills, example, args.seed)


if __name__ == "__main__":
    main()
