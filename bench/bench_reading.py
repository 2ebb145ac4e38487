"""What the bounded reader costs per file: ingest's hash of a file (`common.hash_file`) and encode's
read of a sample's bytes (`LocationReader.read`, with the SHA-256 check encode makes), over many small
image files, in CPU seconds of a child process per code tree, trees alternating.

    python bench/bench_reading.py --files 20000 --tree /tmp/base --tree . --repeat 3

The files (about 20 KB each, as a small JPEG) are made once in a temporary folder and read from
the page cache, so the figures are the per-file overhead (syscalls, chunking), not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import hashlib, json, resource, sys, time
from pathlib import Path
from pipeline.sources.common import Limits, hash_file
from pipeline.sources.locations import Location, LocationReader
paths = sorted(Path(sys.argv[1]).iterdir())
def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime
try:
    from pipeline.sources.reading import Expected
except ImportError:  # a tree before the bounded reader: encode hashed what it read itself
    Expected = None
limits, reader, out = Limits(), LocationReader(), {}
for p in paths[:100]:  # warm the page cache and the imports
    hash_file(p, limits)
t = cpu()
for p in paths:
    hash_file(p, limits)
out["ingest_hash_us"] = (cpu() - t) / len(paths) * 1e6
recorded = {p: hash_file(p, limits)[:2] for p in paths}  # (sha256, size), as ingest records them
t = cpu()
for p in paths:
    sha, size = recorded[p]
    if Expected is None:
        data = reader.read(Location(str(p)))
        assert hashlib.sha256(data).hexdigest() == sha
    else:
        reader.read(Location(str(p)), Expected(size, sha))
out["encode_read_us"] = (cpu() - t) / len(paths) * 1e6
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--tree", type=Path, action="append", help="a code tree (repeatable)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-reading-"))
    try:
        block = os.urandom(20_000)
        for i in range(args.files):
            (folder / f"{i:07d}.jpg").write_bytes(block[i % 97:] + i.to_bytes(8, "little"))
        for _ in range(args.repeat):
            for tree in args.tree or [Path(__file__).resolve().parents[1]]:
                env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
                done = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True,
                                      env=env, cwd=tree, check=True)
                print(json.dumps({"tree": str(tree), **json.loads(done.stdout)}), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
