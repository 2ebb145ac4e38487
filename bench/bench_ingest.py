"""What a second ingest costs: a webdataset tar or CSV manifest grown by M after N, and a no-op D3
ingest with many real images, then one with a D3 file added (the real images' index is needed
again); and D3 whose real-images folder grows by 1% (`d3grow`: --rows D3 rows, half of their real
images missing at first, beside --real other images; then 1% more of each arrive). Each ingest runs
in its own process (peak RSS is its own).

    python bench/bench_ingest.py tar --n 20000 --m 2000 --work /tmp/bench_ingest
    python bench/bench_ingest.py csv --n 20000 --m 2000 --work /tmp/bench_ingest
    python bench/bench_ingest.py d3 --real 200000 --work /tmp/bench_ingest
    python bench/bench_ingest.py d3grow --rows 4000 --real 200000 --work /tmp/bench_ingest

Prints one JSON line per ingest: wall and CPU seconds, bytes through read() (`rchar`) and from disk
(`read_bytes`, 0 when the page cache holds the files), peak RSS, and the ingest's counts. Run the
same command with PYTHONPATH pointing at another checkout to compare releases on one machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Literal


def _io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def _one(args: argparse.Namespace) -> None:
    """Run one ingest in this process and print what it cost."""
    from pipeline.stages.ingest import IngestConfig
    from pipeline.stages.ingest import run as ingest
    from pipeline.store.layout import Store

    kw: dict[str, object] = {}
    if args.format == "webdataset":
        kw["generator"] = "sd-xl"
    if args.real_images:
        kw["real_images"] = Path(args.real_images)
    config = IngestConfig(Path(args.source), args.format, Store(Path(args.store)), **kw)  # type: ignore[arg-type]
    before, t0, c0 = _io(), time.perf_counter(), time.process_time()
    result = ingest(config)
    wall, cpu, after = time.perf_counter() - t0, time.process_time() - c0, _io()
    print(json.dumps({
        "label": args.label, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
        "rchar_MB": round((after["rchar"] - before["rchar"]) / 1e6, 2),
        "read_bytes_MB": round((after["read_bytes"] - before["read_bytes"]) / 1e6, 2),
        "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "added": result.added, "already": result.already_in_store, "units_read": result.units_read,
        "units_skipped": result.units_skipped, "units_resumed": getattr(result, "units_resumed", None),
        # images and problems the read gave (D3: 5 a Parquet row read), D3 rows looked up again, found
        "items": result.added + result.already_in_store + result.duplicates_in_source + sum(result.problems.values()),
        "rechecked": getattr(result, "rechecked", None), "resolved": sum(getattr(result, "resolved", {}).values()),
    }), flush=True)


def _run(label: str, source: Path, fmt: str, store: Path, real: Path | None = None) -> None:
    cmd = [sys.executable, __file__, "one", "--label", label, "--source", str(source), "--format", fmt,
           "--store", str(store)] + (["--real-images", str(real)] if real else [])
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})


def _image(i: int) -> bytes:
    return i.to_bytes(8, "little") * 1024  # 8 KiB, distinct per i


def _append_tar(path: Path, keys: range, mode: Literal["w", "a"]) -> None:
    with tarfile.open(path, mode) as tf:
        for i in keys:
            for name, data in ((f"{i:08d}.jpg", _image(i)), (f"{i:08d}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _tar(args: argparse.Namespace, work: Path) -> None:
    tar, store = work / "shard.tar", work / "store"
    _append_tar(tar, range(args.n), "w")
    _run(f"tar first N={args.n}", tar, "webdataset", store)
    _append_tar(tar, range(args.n, args.n + args.m), "a")
    _run(f"tar grown M={args.m}", tar, "webdataset", store)
    _run("tar no-op", tar, "webdataset", store)


def _csv(args: argparse.Namespace, work: Path) -> None:
    images, csv, store = work / "images", work / "m.csv", work / "store"
    images.mkdir()
    for i in range(args.n + args.m):
        (images / f"{i:08d}.jpg").write_bytes(_image(i))
    with open(csv, "w") as f:
        f.write("path,caption,label,generator\n")
        f.writelines(f"images/{i:08d}.jpg,caption {i},1,sd-xl\n" for i in range(args.n))
    _run(f"csv first N={args.n}", csv, "manifest", store)
    with open(csv, "a") as f:
        f.writelines(f"images/{i:08d}.jpg,caption {i},1,sd-xl\n" for i in range(args.n, args.n + args.m))
    _run(f"csv grown M={args.m}", csv, "manifest", store)
    _run("csv no-op", csv, "manifest", store)


def _fill(real_images: Path, images: range) -> None:
    """img2dataset-like: an image and its json sidecar, 1000 a folder."""
    fill = real_images / "fill"
    for i in images:
        folder = fill / f"{i // 1000:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"x{i:09d}.jpg").write_bytes(i.to_bytes(8, "little"))
        (folder / f"x{i:09d}.json").write_text(json.dumps({"url": f"https://example.invalid/{i}.jpg"}))


def _d3(args: argparse.Namespace, work: Path) -> None:
    from pipeline.synthetic import make_d3

    data = make_d3(work / "d3", rows=40)
    _fill(data.real_images, range(args.real))
    store, files = work / "store", work / "d3" / "files"
    files.mkdir()
    shutil.move(data.parquet, files / "part-0.parquet")
    _run(f"d3 first, {args.real} real images", files, "d3", store, data.real_images)
    _run("d3 no-op", files, "d3", store, data.real_images)
    more = make_d3(work / "more", rows=40, seed=1)  # the same ids, other generated images
    shutil.move(more.parquet, files / "part-1.parquet")
    _run("d3 one Parquet file added", files, "d3", store, data.real_images)


def _d3grow(args: argparse.Namespace, work: Path) -> None:
    from pipeline.synthetic import make_d3

    data = make_d3(work / "d3", rows=args.rows, size=16, missing_real=0, broken_generated=0, row_group_size=64)
    later = work / "later"
    later.mkdir()
    away = sorted(data.real_images.glob("*.jpg"))[1::2]  # half the D3 rows' real images not downloaded yet
    for path in away:
        shutil.move(path, later / path.name)
    _fill(data.real_images, range(args.real))
    store = work / "store"
    _run(f"d3grow first: {args.rows} rows, {len(away)} real missing, {args.real} other images",
         data.parquet, "d3", store, data.real_images)
    _run("d3grow no-op", data.parquet, "d3", store, data.real_images)
    arrive = away[: max(1, len(away) // 100)]
    for path in arrive:
        shutil.move(later / path.name, path)
    _fill(data.real_images, range(args.real, args.real + args.real // 100))
    _run(f"d3grow folder grown 1%: {len(arrive)} missing real + {args.real // 100} other images",
         data.parquet, "d3", store, data.real_images)
    _run("d3grow no-op after", data.parquet, "d3", store, data.real_images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=["tar", "csv", "d3", "d3grow", "one"])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--m", type=int, default=2_000)
    parser.add_argument("--real", type=int, default=200_000)
    parser.add_argument("--rows", type=int, default=4_000)  # d3grow: D3 Parquet rows
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_ingest"))
    for name in ("label", "source", "format", "store", "real-images"):
        parser.add_argument(f"--{name}")
    args = parser.parse_args()
    if args.case == "one":
        _one(args)
        return
    work = args.work / args.case
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    {"tar": _tar, "csv": _csv, "d3": _d3, "d3grow": _d3grow}[args.case](args, work)


if __name__ == "__main__":
    main()
