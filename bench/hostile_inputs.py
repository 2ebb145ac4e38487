"""Hostile inputs against each code tree given: the cases of issue 19 (items 6, 9, 13, 14) that read
files from outside the store, each run as a user types it, in a child process with a time limit.

    python bench/hostile_inputs.py --tree /tmp/base --tree .   # a checkout per tree (git archive | tar -x)

For each case and tree it prints one Markdown row: exit code (or `hung`: killed at the limit),
seconds, the child's peak RSS (from wait4), the last line it printed and what the store holds after
(a `pipeline sql` of that tree). Inputs are made in a temporary folder and removed: huge files are
sparse (`truncate`), so nothing here writes more than a few MB. Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

CLI = "from pipeline.cli import main; main()"
GB = 1024**3


def pipeline(tree: Path, args: list[str], limit: float) -> dict[str, object]:
    """`pipeline ARGS` with `tree`'s code: exit code (None: killed at `limit`), seconds, peak RSS, output."""
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "400"}
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", CLI, *args], cwd=tree, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        status, usage = 0, None
        while time.perf_counter() - started < limit:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.05)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
            status = None
        proc.returncode = 0  # reaped above: Popen must not wait for it again
        seconds = time.perf_counter() - started
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    code = None if status is None else os.waitstatus_to_exitcode(status)
    return {"rc": code, "seconds": seconds, "rss_mb": usage.ru_maxrss / 1024 if usage else 0.0, "out": text}


def jpeg(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def sparse(path: Path, size: int) -> Path:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def folder(root: Path, n: int = 3) -> Path:
    (root / "real").mkdir(parents=True)
    for i in range(n):
        (root / "real" / f"{i}.jpg").write_bytes(jpeg(i))
    return root


def clip_folder(root: Path, paths: list[str | None], image: np.ndarray, text: np.ndarray, labels: list[int]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    np.save(root / "img_emb" / "img_emb_0.npy", image)
    np.save(root / "text_emb" / "text_emb_0.npy", text)
    captions = [f"c{i}" for i in range(len(paths))]
    pq.write_table(pa.table({"image_path": pa.array(paths, pa.string()), "caption": captions, "label": labels}),
                   root / "metadata" / "metadata_0.parquet")
    return root


Case = Callable[[Path, Path], tuple[list[str], str | None]]  # (tree, work) -> (args, SQL shown after)
ENCODE = ["encode", "--model", "Tiny-ViT-16", "--workers", "0"]


def encoded_store(tree: Path, work: Path) -> Path:
    store = work / "store"
    pipeline(tree, ["ingest", str(folder(work / "imgs")), "--format", "folder", "--store", str(store)], 600)
    pipeline(tree, [*ENCODE, "--store", str(store)], 600)
    return store


def encode_fifo(tree: Path, work: Path) -> tuple[list[str], str | None]:
    store = work / "store"
    pipeline(tree, ["ingest", str(folder(work / "imgs")), "--format", "folder", "--store", str(store)], 600)
    (work / "imgs" / "real" / "1.jpg").unlink()
    os.mkfifo(work / "imgs" / "real" / "1.jpg")
    return [*ENCODE, "--store", str(store)], "SELECT reason, count(*) AS n FROM quarantine GROUP BY 1"


def encode_huge(tree: Path, work: Path) -> tuple[list[str], str | None]:
    store = work / "store"
    pipeline(tree, ["ingest", str(folder(work / "imgs")), "--format", "folder", "--store", str(store)], 600)
    sparse(work / "imgs" / "real" / "1.jpg", 3 * GB // 2)
    return [*ENCODE, "--store", str(store)], "SELECT reason, count(*) AS n FROM quarantine GROUP BY 1"


def neighbors_fifo(tree: Path, work: Path) -> tuple[list[str], str | None]:
    store = encoded_store(tree, work)
    os.mkfifo(work / "pipe.jpg")
    return ["neighbors", "--image", str(work / "pipe.jpg"), "--store", str(store)], None


def neighbors_huge(tree: Path, work: Path) -> tuple[list[str], str | None]:
    store = encoded_store(tree, work)
    return ["neighbors", "--image", str(sparse(work / "big.jpg", GB)), "--store", str(store)], None


def neighbors_text(tree: Path, work: Path) -> tuple[list[str], str | None]:
    store = encoded_store(tree, work)
    (work / "notes.jpg").write_text("not pixels")
    return ["neighbors", "--image", str(work / "notes.jpg"), "--store", str(store)], None


def import_etc(tree: Path, work: Path) -> tuple[list[str], str | None]:
    rng = np.random.default_rng(0)
    root = clip_folder(work / "feats", ["/etc/passwd"], rng.normal(size=(1, 8)).astype(np.float32),
                       rng.normal(size=(1, 8)).astype(np.float32), [1])
    digest = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    return (["import-features", str(root), "--layout", "clip-retrieval", "--model-key", "m", "--store",
             str(work / "store")],
            f"SELECT count(*) FILTER (sample_id = '{digest}') AS etc_passwd_as_sample, "
            "count(*) FILTER (source_uri = '/etc/passwd') AS pointing_at_it FROM samples")


def import_unsound(tree: Path, work: Path) -> tuple[list[str], str | None]:
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)
    image[0, 0], image[1, 1], image[2] = np.nan, np.inf, 0.0
    image[4] = image[3]  # the same vector, labelled real (row 3) and generated (row 4)
    root = clip_folder(work / "feats", [None] * 6, image, text, [1, 1, 1, 0, 1, 0])
    return (["import-features", str(root), "--layout", "clip-retrieval", "--model-key", "m", "--store",
             str(work / "store")],
            "SELECT (SELECT count(*) FROM embeddings WHERE NOT isfinite(list_dot_product(vector, vector)) "
            "OR list_dot_product(vector, vector) < 0.5) AS unsound_vectors, (SELECT count(*) FROM samples) AS samples, "
            "(SELECT string_agg(reason, ' ' ORDER BY reason) FROM quarantine) AS quarantined")


def _bad_npy(array: np.ndarray) -> Case:
    def case(tree: Path, work: Path) -> tuple[list[str], str | None]:
        root = clip_folder(work / "feats", [None], np.ones((1, 2), np.float32), np.ones((1, 2), np.float32), [0])
        np.save(root / "img_emb" / "img_emb_0.npy", array, allow_pickle=True)
        return ["import-features", str(root), "--layout", "clip-retrieval", "--model-key", "m", "--store",
                str(work / "store")], None
    return case


def ingest_not_utf8(tree: Path, work: Path) -> tuple[list[str], str | None]:
    root = folder(work / "imgs")
    with open(os.fsencode(root / "real") + b"/caf\xe9.jpg", "wb") as f:
        f.write(jpeg(9))
    return (["ingest", str(root), "--format", "folder", "--store", str(work / "store")],
            "SELECT count(*) AS samples, count(*) FILTER (source_uri LIKE 'file://%') AS as_uri FROM samples")


def manifest_caption(size: int) -> Case:
    def case(tree: Path, work: Path) -> tuple[list[str], str | None]:
        rows = []
        for i in range(4):
            (work / f"{i}.jpg").write_bytes(jpeg(i))
            rows.append(f"{i}.jpg,{'y' * size if i == 2 else 'short'},0,real")
        (work / "m.csv").write_text("path,caption,label,generator\n" + "\n".join(rows) + "\n")
        return (["ingest", str(work / "m.csv"), "--format", "manifest", "--store", str(work / "store")],
                "SELECT (SELECT count(*) FROM samples) AS samples, (SELECT string_agg(reason, ' ') FROM quarantine) "
                "AS quarantined")
    return case


CASES: dict[str, Case] = {
    "encode: an ingested image replaced by a FIFO": encode_fifo,
    "encode: an ingested image replaced by a 1.5 GB file": encode_huge,
    "neighbors --image FIFO": neighbors_fifo,
    "neighbors --image 1 GB file": neighbors_huge,
    "neighbors --image a text file": neighbors_text,
    "import-features: image_path /etc/passwd": import_etc,
    "import-features: NaN, inf, zero and an opposite-label duplicate": import_unsound,
    "import-features: a 1-D .npy": _bad_npy(np.ones(4, np.float32)),
    "import-features: a string .npy": _bad_npy(np.array([["a", "b"]])),
    "import-features: an object .npy": _bad_npy(np.array([[{"x": 1}, None]], dtype=object)),
    "ingest: a folder file name that is not UTF-8": ingest_not_utf8,
    "ingest: a manifest caption of 1.5 MB": manifest_caption(3 << 19),
    "ingest: a manifest caption of 3 MB": manifest_caption(3 << 20),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, action="append", help="a code tree (repeatable)")
    parser.add_argument("--limit", type=float, default=60, help="seconds a command may take before it counts as hung")
    parser.add_argument("--only", help="run the cases whose name holds this text")
    args = parser.parse_args()
    trees = [t.resolve() for t in args.tree or [Path(__file__).resolve().parents[1]]]
    print("| case | tree | exit | s | peak RSS MB | last line | store after |\n|---|---|---|---|---|---|---|")
    for name, case in CASES.items():
        if args.only and args.only not in name:
            continue
        for tree in trees:
            work = Path(tempfile.mkdtemp(prefix="hostile-"))
            try:
                command, sql = case(tree, work)
                got = pipeline(tree, command, args.limit)
                lines = [line.strip() for line in str(got["out"]).splitlines() if line.strip()]
                last = "(killed: still running)" if got["rc"] is None else (lines[-1] if lines else "")
                after = ""
                if sql and (work / "store").exists():
                    shown = pipeline(tree, ["sql", sql, "--store", str(work / "store"), "--format", "csv"], 120)
                    after = " ".join(str(shown["out"]).split())
                rc = "hung" if got["rc"] is None else got["rc"]
                print(f"| {name} | {tree.name} | {rc} | {got['seconds']:.1f} | {got['rss_mb']:.0f} | "
                      f"{last[:160].replace('|', '/')} | {after[:120]} |", flush=True)
            finally:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
