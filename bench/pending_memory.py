"""Peak memory of `encode`'s pending-images query over N sample rows of which none is encoded.

The first `pipeline encode` of a D3 store (11.5M images) finds every image pending: an anti-join
with the model's vectors, one row per image hash, sorted by location. Synthetic rows (D3-like
locations, half as many vectors of other hashes) are written once to DIR; the query then runs on
plain DuckDB views, unbounded or within a memory limit, each N in its own process:

    python bench/pending_memory.py --rows 1000000 4000000 8000000 [--limit 512MB|none]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(rows: int, limit: str, work: Path) -> None:
    import duckdb

    sys.path.insert(0, str(ROOT))
    from pipeline.stages.encode import pending_images_sql

    d = work / f"s{rows}"
    con = duckdb.connect()
    if not d.exists():
        d.mkdir(parents=True)
        con.execute(f"""COPY (SELECT sha256(i::VARCHAR) AS sample_id, 'd3' AS source_format,
          '/data/d3/part-' || (i // 100000)::VARCHAR || '.parquet' AS source_uri, NULL::VARCHAR AS source_member,
          (i % 100000)::BIGINT AS source_row, NULL::BIGINT AS byte_offset, NULL::BIGINT AS byte_length
          FROM range({rows}) t(i)) TO '{d}/samples.parquet' (FORMAT parquet)""")
        con.execute(f"COPY (SELECT sha256((i * 7)::VARCHAR) AS content_hash, 'image' AS modality, 'k' AS model_key "
                    f"FROM range({rows // 2}) t(i)) TO '{d}/emb.parquet' (FORMAT parquet)")
        con.execute(f"COPY (SELECT 'x' AS content_hash, 'decode' AS stage WHERE false) TO '{d}/q.parquet' "
                    "(FORMAT parquet)")
    for view, file in (("samples", "samples"), ("embeddings", "emb"), ("quarantine", "q")):
        con.execute(f"CREATE VIEW {view} AS SELECT * FROM '{d}/{file}.parquet'")
    if limit != "none":
        con.execute(f"SET memory_limit = '{limit}'")
        con.execute(f"SET temp_directory = '{tempfile.mkdtemp(dir=work)}'")
    t, pending = time.perf_counter(), 0
    for batch in con.sql(pending_images_sql(False), params={"key": "k"}).to_arrow_reader(65536):
        pending += batch.num_rows
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{rows:>10,} rows  limit {limit:>6}  {pending:>10,} pending  {time.perf_counter() - t:6.1f} s  "
          f"peak RSS {rss:6.0f} MB", flush=True)


def main() -> None:
    from pipeline.stages.encode import PENDING_MEMORY

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--limit", default=PENDING_MEMORY, help="DuckDB memory_limit, or none")
    parser.add_argument("--work", type=Path, help="keep the synthetic rows here (default: a temp dir)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pending-"))
    if args.one:
        one(args.one, args.limit, work)
        return
    for rows in args.rows:
        subprocess.run([sys.executable, __file__, "--one", str(rows), "--limit", args.limit, "--work", str(work)],
                       check=True)


if __name__ == "__main__":
    main()
