"""The store against hostile use, for each code tree given: the cases of issue 19 about what the
store touches, what a reader reads and what a killed process leaves (items 1-5, 7, 10, 11), each
run as a user types it, with that tree's code, on a tiny store that tree made.

    python bench/hostile_store.py --tree /tmp/base --tree .   # a checkout per tree (git archive | tar -x)

For each case and tree it prints one Markdown row: the exit codes of the commands the case runs and
what the case found after them (the file left at the output path, rows doubled or lost, processes
still running...). A device node is made with mknod (as root) in a temporary folder, never /dev/null
itself. Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kill import alive, descendants  # noqa: E402 - (this checkout's pipeline.children)
from hostile_inputs import pipeline  # noqa: E402 - the same child runner (rc, seconds, RSS, output)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "Tiny-ViT-16", "--workers", "0"]


def rc(tree: Path, args: list[str], limit: float = 600) -> tuple[int | str, str]:
    got = pipeline(tree, args, limit)
    lines = [line.strip() for line in str(got["out"]).splitlines() if line.strip()]
    return ("hung" if got["rc"] is None else got["rc"]), " ".join(lines)[-300:]


def sql(tree: Path, store: Path, query: str) -> str:
    got = pipeline(tree, ["sql", query, "--format", "csv", "--store", str(store)], 120)
    return " ".join(str(got["out"]).split()[1:]) if got["rc"] == 0 else f"(sql rc {got['rc']})"


def kind(path: Path) -> str:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "gone"
    for test, name in ((stat.S_ISLNK, "symlink"), (stat.S_ISCHR, "char device"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISDIR, "directory"), (stat.S_ISREG, "regular file")):
        if test(mode):
            return name
    return "other"


# --- stores each tree makes for itself --------------------------------------------------------------

def make_stores(tree: Path, work: Path) -> dict[str, Path]:
    from pipeline.synthetic import make_d3

    data = make_d3(work / "src", rows=12, size=48)
    big = make_d3(work / "src-big", rows=80, size=64)
    ingested, trained, many = work / "ingested", work / "trained", work / "many"
    for store, d in ((ingested, data), (many, big)):
        pipeline(tree, ["ingest", str(d.parquet), "--format", "d3", "--real-images", str(d.real_images),
                        "--store", str(store)], 600)
    shutil.copytree(ingested, trained, symlinks=True)
    pipeline(tree, ["encode", *TINY, "--store", str(trained)], 600)
    pipeline(tree, ["train", "--epochs", "2", "--batch-size", "16", "--store", str(trained)], 600)
    (work / "source.json").write_text(json.dumps({"parquet": str(data.parquet), "real": str(data.real_images)}))
    return {"ingested": ingested, "trained": trained, "many": many}


def copy(stores: dict[str, Path], name: str, work: Path) -> Path:
    target = work / f"case-{name}"
    shutil.copytree(stores[name], target, symlinks=True)
    return target


def run_id(tree: Path, store: Path) -> str:
    return sql(tree, store, "SELECT min(run_id) FROM runs").strip()


# --- the cases: (tree, stores, work) -> (exit codes, what was found) ---------------------------------

Case = Callable[[Path, dict[str, Path], Path], tuple[str, str]]


def sql_output(what: str) -> Case:
    def case(tree: Path, stores: dict[str, Path], work: Path) -> tuple[str, str]:
        target = work / "target"
        if what == "char device":
            os.mknod(target, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        elif what == "FIFO":
            os.mkfifo(target)
        elif what == "symlink":
            (work / "linked.txt").write_text("keep")
            target.symlink_to(work / "linked.txt")
        else:
            target.mkdir()
        code, _ = rc(tree, ["sql", "SELECT 1 AS x", "--format", "csv", "--output", str(target), "--store",
                            str(stores["trained"])], 60)
        return str(code), f"the {what} is now: {kind(target)}"
    return case


def landscape_manifest(tree: Path, stores: dict[str, Path], work: Path) -> tuple[str, str]:
    store = copy(stores, "trained", work)
    code, _ = rc(tree, ["landscape", "--run", run_id(tree, store), "--steps", "3", "--output",
                        str(store / "manifest.json"), "--store", str(store)])
    after, said = rc(tree, ["status", "--store", str(store)])
    return f"{code}; status {after}", said[-110:] if after != 0 else "manifest intact, status reads"


def report_samples(tree: Path, stores: dict[str, Path], work: Path) -> tuple[str, str]:
    store = copy(stores, "trained", work)
    before = set(os.listdir(store / "samples"))
    code, _ = rc(tree, ["report", "--run", run_id(tree, store), "--output", str(store / "samples"),
                        "--store", str(store)])
    return str(code), f"{len(set(os.listdir(store / 'samples')) - before)} files added to samples/"


def lock_symlink(tree: Path, stores: dict[str, Path], work: Path) -> tuple[str, str]:
    store = copy(stores, "trained", work)
    (store / ".lock").unlink(missing_ok=True)
    bashrc = work / "bashrc"
    bashrc.write_text("export PATH=/usr/bin\n")
    (store / ".lock").symlink_to(bashrc)
    code, _ = rc(tree, ["index", "build", "--store", str(store)])
    return str(code), "target untouched" if bashrc.read_text() == "export PATH=/usr/bin\n" else \
        f"target now: {bashrc.read_text().splitlines()[0]!r}…"


PAUSED = """
import sys
from pathlib import Path
from pipeline.encoding.clip import ModelSpec
from pipeline.errors import PipelineError
from pipeline.stages import encode
from pipeline.store import writes
from pipeline.store.layout import Store
writes.COMMIT_EVERY_SHARDS = 2
original, calls = writes.commit_staged, []
def paused(store, staged):
    calls.append(1)
    if len(calls) == 2:
        print("PAUSED", flush=True)
        sys.stdin.readline()
    return original(store, staged)
writes.commit_staged = paused
try:
    encode.run(encode.EncodeConfig(Store(Path(sys.argv[1])), ModelSpec("Tiny-ViT-16"), workers=0, batch_size=4,
                                   shard_rows=4))
    print("FIRST rc 0")
except PipelineError as exc:
    print("FIRST stopped:", exc)
"""


def lock_removed(tree: Path, stores: dict[str, Path], work: Path) -> tuple[str, str]:
    store = copy(stores, "ingested", work)
    first = subprocess.Popen([sys.executable, "-c", PAUSED, str(store)], cwd=tree, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(tree)})
    assert first.stdout is not None
    line = first.stdout.readline()
    if line.strip() != "PAUSED":
        first.kill()
        return "-", f"the first encode did not pause: {line.strip()}"
    (store / ".lock").unlink()
    second, _ = rc(tree, ["encode", *TINY, "--store", str(store)])
    out, _ = first.communicate("go\n", timeout=300)
    rows = sql(tree, store, "SELECT count(*) AS n, count(DISTINCT (modality, content_hash)) AS k FROM embeddings")
    said = "stopped" if "stopped" in out else "rc 0"
    return f"first {said}, second {second}", f"embeddings rows, distinct keys: {rows}"


def deleted_shard(tree: Path, stores: dict[str, Path], work: Path) -> tuple[str, str]:
    store = copy(stores, "ingested", work)
    source = json.loads((work.parent / "source.json").read_text())
    before = sql(tree, store, "SELECT count(*) FROM samples")
    sorted((store / "samples").glob("*.parquet"))[0].unlink()
    status, _ = rc(tree, ["status", "--store", str(store)])
    repair, said = rc(tree, ["verify", "--repair", "--store", str(store)])
    ingest, _ = rc(tree, ["ingest", source["parquet"], "--format", "d3", "--real-images", source["real"],
                          "--store", str(store)])
    after = sql(tree, store, "SELECT count(*) FROM samples")
    found = "no damage found" if "no damage found" in said else "damage listed"
    return f"status {status}, verify --repair {repair} ({found}), ingest {ingest}", f"samples {before} → {after}"


def bit_flip(tree: Path, stores: dict[str, Path], work: Path) -> tuple[str, str]:
    import pyarrow.parquet as pq

    store = copy(stores, "trained", work)
    ids = sql(tree, store, "SELECT sample_id FROM samples ORDER BY 1")
    shard = sorted((store / "samples").glob("*.parquet"))[0]
    meta = pq.ParquetFile(shard).metadata
    col = meta.row_group(0).column(meta.schema.to_arrow_schema().names.index("sample_id"))
    at = col.data_page_offset + col.total_compressed_size // 2
    st = shard.stat()
    with open(shard, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    got = [rc(tree, args + ["--store", str(store)]) for args in
           (["status"], ["sql", "SELECT sample_id FROM samples ORDER BY 1", "--format", "csv"],
            ["train", "--epochs", "1", "--batch-size", "16", "--seed", "9"])]
    now = sql(tree, store, "SELECT sample_id FROM samples ORDER BY 1")
    changed = "sql returns changed ids" if now != ids and not now.startswith("(sql rc") else "no changed id returned"
    named = [name for name, (_, said) in zip(("status", "sql", "train"), got, strict=True) if "damaged" in said]
    return (f"status {got[0][0]}, sql {got[1][0]}, train {got[2][0]}",
            f"{changed}; damage named by: {', '.join(named) or 'none'}")


def dead_temp(tree: Path, stores: dict[str, Path], work: Path) -> tuple[str, str]:
    store = copy(stores, "trained", work)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in os.uname().nodename)[:40]
    temp = store / "scores" / f".RUN-report-groups.parquet.{host}~{dead.pid}~0123abcd.tmp"
    temp.write_bytes(b"half")
    code, _ = rc(tree, ["status", "--store", str(store)])
    return f"status {code}", "temp left" if temp.exists() else "temp swept"


def not_a_store(tree: Path, stores: dict[str, Path], work: Path) -> tuple[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = work / "my-data"
    (folder / "samples").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), folder / "mine.parquet")
    pq.write_table(pa.table({"y": [2]}), folder / "samples" / "theirs.parquet")
    before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    codes = [rc(tree, [*args, "--store", str(folder)])[0] for args in (["catalog", "rebuild"], ["verify", "--repair"])]
    after = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    added = sorted(set(after) - set(before))
    return f"rebuild {codes[0]}, verify --repair {codes[1]}", ("nothing written" if not added else
                                                               f"now holds {', '.join(added[:4])}")


def killed_parent(which: str) -> Case:
    def case(tree: Path, stores: dict[str, Path], work: Path) -> tuple[str, str]:
        if which == "encode":
            store = copy(stores, "many", work)
            args, workers = ["encode", "--model", "Tiny-ViT-16", "--workers", "2", "--batch-size", "4"], 3
        else:
            store = copy(stores, "trained", work)
            (work / "grid.toml").write_text("[grid]\nepochs = [300]\nseed = [0, 1, 2, 3]\nbatch_size = [16]\n")
            args, workers = ["sweep", "--grid", str(work / "grid.toml"), "--jobs", "2"], 2
        proc = subprocess.Popen([sys.executable, "-c", "from pipeline.cli import main; main()", *args, "--store",
                                 str(store)], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        family: set[int] = set()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            family |= descendants(proc.pid)
            if len(family) > workers:  # the workers and multiprocessing's resource tracker
                break
            time.sleep(0.1)
        time.sleep(2)
        family |= descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(10)
        left = [p for p in family if alive(p)]
        rss = sum(int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                  for p in left if alive(p)) / 1e6
        for p in left:
            os.kill(p, signal.SIGKILL)
        return "killed", f"{len(left)} of its {len(family)} processes still running 10 s later ({rss:.0f} MB)"
    return case


CASES: dict[str, Case] = {
    "sql --output a character device (like /dev/null)": sql_output("char device"),
    "sql --output a FIFO": sql_output("FIFO"),
    "sql --output a symlink": sql_output("symlink"),
    "sql --output a directory": sql_output("directory"),
    "landscape --output STORE/manifest.json": landscape_manifest,
    "report --output STORE/samples": report_samples,
    "STORE/.lock a symlink to ~/.bashrc, then index build": lock_symlink,
    "two encodes, STORE/.lock removed between them": lock_removed,
    "a samples shard deleted; status, verify --repair, ingest": deleted_shard,
    "a bit flipped in place, size and mtime kept; status, sql, train": bit_flip,
    "a dead process' temp in scores/, then status": dead_temp,
    "catalog rebuild / verify --repair --store a user folder": not_a_store,
    "encode --workers 2, its parent killed": killed_parent("encode"),
    "sweep --jobs 2, its parent killed": killed_parent("sweep"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, action="append", help="a code tree (repeatable)")
    parser.add_argument("--only", help="run the cases whose name holds one of these texts (comma-separated)")
    args = parser.parse_args()
    trees = [t.resolve() for t in args.tree or [ROOT]]
    print("| case | tree | exit | found |\n|---|---|---|---|")
    base = Path(tempfile.mkdtemp(prefix="hostile-store-"))
    try:
        stores = {}
        for i, tree in enumerate(trees):
            (base / str(i)).mkdir()
            stores[tree] = make_stores(tree, base / str(i))
        for name, case in CASES.items():
            if args.only and not any(part in name for part in args.only.split(",")):
                continue
            for i, tree in enumerate(trees):
                work = Path(tempfile.mkdtemp(prefix="case-", dir=base / str(i)))
                try:
                    codes, found = case(tree, stores[tree], work)
                except Exception as exc:  # noqa: BLE001 - a case that breaks is a row, not the end
                    codes, found = "-", f"case failed: {type(exc).__name__}: {exc}"
                print(f"| {name} | {tree.name} | {codes} | {found.replace('|', '/')} |", flush=True)
                shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
