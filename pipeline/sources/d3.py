"""ELSA D3: Parquet export (one row → 4 generated + 1 real sample) or its webdataset form.

Parquet columns: `id`, `original_prompt`, `positive_prompt`, `url` (or `img_url`), and for
k = 0..3 `image_gen{k}` (Hugging Face image struct {bytes, path}) and `model_gen{k}`. Generated
samples get the prompt, the real one its original caption; all five share the group `d3:<id>`, so
they always fall into one split. The real image comes from `--real-images`, matched by id or URL.

Webdataset form: `KEY.real.jpg`, `KEY.gen_0.jpg` … `KEY.gen_3.jpg`, `KEY.caption.txt`,
`KEY.url.txt` (and optionally `KEY.prompt.txt` for the generation prompt).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.sources.common import (
    REAL,
    Candidate,
    Item,
    Problem,
    RealImageIndex,
    image_member,
    iter_tar_entries,
    tar_location,
    tar_member_bytes,
    tar_text,
)
from pipeline.sources.locations import Location, LocationReader

NUM_GENERATED = 4
DEFAULT_GENERATORS = ("sd-1.4", "sd-2.1", "sd-xl", "deepfloyd-if")
_URL_COLUMNS = ("url", "img_url")


def iter_d3(
    source: Path,
    real_images: Path | None,
    generators: tuple[str, ...] = DEFAULT_GENERATORS,
) -> Iterator[Item]:
    tars = [source] if source.suffix == ".tar" else sorted(source.glob("**/*.tar")) if source.is_dir() else []
    if tars:
        for tar in tars:
            yield from _iter_webdataset(tar, generators)
        return
    files = [source] if source.is_file() else sorted(source.glob("**/*.parquet"))
    if not files:
        raise PipelineError(f"{source} holds no D3 Parquet files or webdataset tars.")
    index = RealImageIndex(real_images) if real_images else None
    for path in files:
        yield from _iter_parquet(path, index)


def _iter_parquet(path: Path, index: RealImageIndex | None) -> Iterator[Item]:
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    url_col = next((c for c in _URL_COLUMNS if c in names), None)
    required = {"id", "original_prompt", "positive_prompt"} | {
        f"{p}{k}" for k in range(NUM_GENERATED) for p in ("image_gen", "model_gen")
    }
    missing = sorted(required - names)
    if missing or url_col is None:
        need = missing + ([] if url_col else ["url (or img_url)"])
        raise PipelineError(f"{path} is not in the D3 layout: it lacks {', '.join(need)}.")
    uri = str(path.resolve())
    row_base = 0
    for batch in pf.iter_batches(batch_size=64):
        rows = batch.to_pylist()
        for i, row in enumerate(rows):
            global_row = row_base + i
            group = f"d3:{row['id']}"
            for k in range(NUM_GENERATED):
                column = f"image_gen{k}"
                loc = Location(uri=uri, member=column, row=global_row)
                cell = row[column] or {}
                data = cell.get("bytes") or b""
                if not data and cell.get("path"):
                    try:
                        data = (path.parent / cell["path"]).read_bytes()
                    except OSError as exc:
                        yield Problem("unreadable", f"row {row['id']} {column}: {exc}", loc)
                        continue
                yield Candidate(
                    data=data,
                    location=loc,
                    label=1,
                    generator=str(row[f"model_gen{k}"] or f"gen{k}"),
                    group_key=group,
                    text=row["positive_prompt"],
                )
            yield from _real_sample(row, url_col, group, index, uri, global_row)
        row_base += len(rows)


def _real_sample(
    row: dict, url_col: str, group: str, index: RealImageIndex | None, uri: str, global_row: int
) -> Iterator[Item]:
    url = row.get(url_col)
    loc = index.find(row["id"], url) if index else None
    if loc is None:
        why = "no --real-images given" if index is None else "not found in --real-images"
        yield Problem(
            "real_image_missing",
            f"row {row['id']}: real image {url or '(no url)'} {why}",
            Location(uri=uri, member=url_col, row=global_row),
        )
        return
    try:
        data = LocationReader().read(loc)
    except OSError as exc:
        yield Problem("unreadable", f"row {row['id']}: {exc}", loc)
        return
    yield Candidate(data, loc, 0, REAL, group, row["original_prompt"])


def _iter_webdataset(tar: Path, generators: tuple[str, ...]) -> Iterator[Item]:
    for tf, entry in iter_tar_entries(tar):
        caption = tar_text(tf, entry, "caption.txt")
        prompt = tar_text(tf, entry, "prompt.txt") or caption
        group = f"d3:{entry.key.rpartition('/')[2]}"
        slots = [("real", 0, REAL, caption)] + [
            (f"gen_{k}", 1, generators[k] if k < len(generators) else f"gen{k}", prompt)
            for k in range(NUM_GENERATED)
        ]
        for name, label, generator, text in slots:
            member = image_member(entry, name)
            if member is None:
                yield Problem(
                    "real_image_missing" if label == 0 else "image_missing",
                    f"key {entry.key}: no {name} image in {tar.name}",
                    Location(uri=str(tar.resolve()), member=f"{entry.key}.{name}"),
                )
                continue
            yield Candidate(
                data=tar_member_bytes(tf, member),
                location=tar_location(tar, member),
                label=label,
                generator=generator,
                group_key=group,
                text=text,
            )
