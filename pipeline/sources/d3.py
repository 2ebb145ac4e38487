"""ELSA D3: Parquet export (one row → 4 generated + 1 real sample) or its webdataset form.

Parquet columns: `id`, `original_prompt`, `positive_prompt` (strings), `url` (or `img_url`), and for
k = 0..3 `image_gen{k}` (the image: the Hugging Face image struct {bytes, path}, or plain binary) and
`model_gen{k}`, the name of the generator of that column (the truth about which generator made which
image). A column of another type (a list of prompts, an image as a string) is refused in one sentence
naming the file and the column. Generated samples get the prompt, the real one its original
caption; all five share the group `d3:<id>`, so they always fall into one split. The real image
comes from `--real-images`, matched by id or URL.

Webdataset form (as written by CoDE's `wds_creation.py`): key `<dataset>__<split>__<id>`, members
`KEY.real.jpg`, `KEY.gen_0.jpg` … `KEY.gen_3.jpg`, `KEY.caption.txt`, `KEY.url.txt` (optionally
`KEY.prompt.txt`; CoDE's shards have none, so generated images get the caption). It carries no
generator names: `gen_k` is the Parquet row's `image_gen{k}` re-encoded, so `--generators` lists the
Parquet `model_gen0..3` order, by default D3's own (`DEFAULT_GENERATORS`). The order in use is
checked against what can be seen (`pipeline.sources.d3_order`). The same D3 row gets the group
`d3:<id>` in both forms, and its declared split is `<split>` (Parquet: the file's folder or name,
`train`/`validation`/`test`).

Each Parquet file or tar is one unit. A tar appended to, or a Parquet file rewritten with row groups
added after the same bytes, is read from where the last read stopped (the ledger's resume point).
The real images' index lives in the store's cache (`pipeline.sources.real_images`).

The real-images folder is not part of the options that decide whether a Parquet file is read again:
it is a unit of its own (`real_images_unit`: its `directory_fingerprint`, per D3 source). When it
changed, only the rows quarantined as `real_image_missing` are looked up again (`recheck`: their
id and URL columns read, no image column) and those now found become samples, each with a
`Resolved` row beside its quarantine row. An image replaced in place (same name, new bytes) is not
read again: its sample keeps the hash of the bytes first read.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import PipelineError, first_line
from pipeline.sources.common import (
    REAL,
    Candidate,
    DamagedArchive,
    Item,
    Items,
    Limits,
    Problem,
    Resolved,
    Resume,
    Returning,
    Unit,
    absolute,
    archive_problem,
    directory_fingerprint,
    hash_bytes,
    hash_location,
    image_member,
    iter_tar_entries,
    parquet_fingerprint,
    resume_point,
    stat_unit,
    tar_candidate_or_problem,
    tar_text,
)
from pipeline.sources.d3_order import D3_ORDER, OrderCheck, OrderTally
from pipeline.sources.generators import canonical
from pipeline.sources.locations import Location
from pipeline.sources.reading import ensure_regular
from pipeline.sources.real_images import RealImageIndex
from pipeline.store.layout import Store

NUM_GENERATED = 4
# D3's model_gen0..3 (record 1275001022128: DeepFloyd/IF-I-M-v1.0, SD 2.1, SD XL base 1.0, SD 1.4). CoDE's
# shards keep the columns (its gen_k.jpg is that row's image_gen{k} pixel for pixel, re-encoded), and so
# does the reference code's h5 (get_data.py writes the Parquet's image_gen{k} as dataset image_gen{k}).
DEFAULT_GENERATORS = D3_ORDER
REAL_MISSING = "real_image_missing"
_MODEL_COLUMNS = tuple((f"model_gen{k}", f"gen{k}") for k in range(NUM_GENERATED))  # and the name of a null
_URL_COLUMNS = ("url", "img_url")
_SPLIT_NAMES = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val",
                "test": "test", "testing": "test"}
_SPLIT_IN_NAME = re.compile(r"(?:^|[^a-z])(train|training|validation|valid|val|test|testing)(?:[^a-z]|$)")


class D3Source:
    def __init__(self, source: Path, real_images: Path | None, generators: tuple[str, ...],
                 limits: Limits, cache: Path | None = None) -> None:
        self.source = source
        self.real_images = real_images
        self.cache = cache  # where the real images' index is kept (the store's cache/real-images)
        self._real_fingerprint: str | None = None
        self.generators = tuple(canonical(g) for g in generators)
        self.limits = limits
        self._index: RealImageIndex | None = None
        self.tally = OrderTally()  # the model_gen0..3 orders of the Parquet rows read
        tars = [source] if source.suffix == ".tar" else sorted(source.glob("**/*.tar")) if source.is_dir() else []
        self.tars = tars
        self.files = [] if tars else ([source] if source.is_file() else sorted(source.glob("**/*.parquet")))
        if not tars and not self.files:
            raise PipelineError(f"{source} holds no D3 Parquet files or webdataset tars.")

    def options(self) -> dict[str, object]:
        # the folder's path only: its state is `real_images_unit`'s, so a grown folder re-reads no file
        real = {"path": str(self.real_images.resolve())} if self.real_images is not None and not self.tars else None
        return {"generators": list(self.generators) if self.tars else None, "real_images": real}

    def order_check(self, store: Store) -> OrderCheck:
        """The check of this source's generator order against the store's other D3 forms and, for the
        Parquet form, against the rows it reads."""
        return OrderCheck(store, "webdataset" if self.tars else "parquet", self.generators, self.tally)

    def real_images_unit(self) -> Unit | None:
        """The real-images folder as a ledger unit of this D3 source: unread (changed since it was
        recorded) means the rows quarantined as `real_image_missing` are looked up again."""
        if self.real_images is None or self.tars:
            return None
        state = self._fingerprint()
        return Unit(self.real_images, -1, -1, state, f"real images of {absolute(self.source)} at {state}")

    def _fingerprint(self) -> str:
        assert self.real_images is not None
        if self._real_fingerprint is None:  # once: the index and the ledger see one state
            self._real_fingerprint = directory_fingerprint(self.real_images)
        return self._real_fingerprint

    def growing(self) -> list[Path]:
        # tars appended to, and Parquet files rewritten with row groups added after the same bytes,
        # are read from where the last read stopped
        return [*self.tars, *self.files]

    def units(self, resume: Mapping[str, Resume]) -> Iterator[Unit]:
        for tar in self.tars:
            yield stat_unit(tar, resume=resume.get(absolute(tar)))
        for path in self.files:
            yield stat_unit(path, parquet_fingerprint(path), resume=resume.get(absolute(path)))

    def items(self, unit: Unit) -> Items:
        if unit.path.suffix == ".tar":
            return (yield from self._webdataset(unit.path, unit.resume.offset if unit.resume else 0))
        start = unit.resume.offset if unit.resume else 0
        if len(self.files) == 1:
            return (yield from self._parquet(unit.path, start))  # the one file given: its damage is the error
        try:  # one damaged file of many is quarantined; the others are read
            return (yield from self._parquet(unit.path, start))
        except PipelineError as exc:
            yield Problem("unreadable_source", str(exc).rstrip("."), Location(uri=absolute(unit.path)))
            return None

    # --- Parquet form ---

    def _parquet(self, path: Path, start: int) -> Items:
        """The rows of the row groups that begin at byte `start` or later (0: all); returns where
        the next read starts: the end of the last row group (row groups written after it, in a file
        whose bytes before it are the same, are read alone)."""
        try:
            ensure_regular(path)  # pyarrow opens it by name: a FIFO must not get that far
            pf = pq.ParquetFile(path)
        except Exception as exc:  # noqa: BLE001 - a JPEG given as --format d3, a truncated file, …
            raise PipelineError(f"{path} is not a readable Parquet file, so not D3 ({first_line(exc)}).") from exc
        names = set(pf.schema_arrow.names)
        url_col = next((c for c in _URL_COLUMNS if c in names), None)
        required = {"id", "original_prompt", "positive_prompt"} | {
            f"{p}{k}" for k in range(NUM_GENERATED) for p in ("image_gen", "model_gen")
        }
        missing = sorted(required - names)
        if missing or url_col is None:
            need = missing + ([] if url_col else ["url (or img_url)"])
            raise PipelineError(f"{path} is not in the D3 layout: it lacks {', '.join(need)}.")
        _check_types(path, pf.schema_arrow, url_col)
        spans = _row_group_spans(pf.metadata)
        todo = [i for i, (begin, _, _) in enumerate(spans) if begin >= start]
        if not todo:
            return resume_point(path, start, spans[-1][2] if spans else 0) if start else None
        index = self._real_index()
        split = split_from_path(path)
        uri = absolute(path)
        row_base = spans[todo[0]][2] - pf.metadata.row_group(todo[0]).num_rows
        batches = pf.iter_batches(batch_size=64, row_groups=todo)
        while True:
            try:
                batch = next(batches, None)
            except Exception as exc:  # noqa: BLE001 - a page that does not decode, wherever it is
                raise PipelineError(f"{path} is damaged after row {row_base} ({first_line(exc)}).") from exc
            if batch is None:
                break
            rows = batch.to_pylist()
            for i, row in enumerate(rows):
                global_row = row_base + i
                group = f"d3:{row['id']}"
                models = tuple([str(row[column] or fallback) for column, fallback in _MODEL_COLUMNS])
                self.tally.add(models, path)
                for k in range(NUM_GENERATED):
                    yield self._generated(path, uri, row, k, models[k], global_row, group, split)
                yield from self._real_sample(row, url_col, group, index, uri, global_row, split)
            row_base += len(rows)
        return resume_point(path, spans[-1][1], row_base)

    def _generated(self, path: Path, uri: str, row: dict, k: int, original: str, global_row: int, group: str,
                   split: str | None) -> Item:
        column = f"image_gen{k}"
        loc = Location(uri=uri, member=column, row=global_row)
        cell = row[column]
        # plain binary holds the bytes; the Hugging Face image struct the bytes or a path beside the file
        image: dict[str, Any] = {"bytes": cell} if isinstance(cell, bytes) else cell or {}
        data, relative = image.get("bytes") or b"", image.get("path")
        if not data and not relative:  # D3 has rows whose generator gave no image
            return Problem("image_missing", f"row {row['id']} {column} holds no image", loc)
        if not data and relative:  # a file beside the Parquet file, never one outside its folder
            beside = Limits.within([path.parent], self.limits.max_bytes)
            hashed = hash_location(Location(uri=absolute(path.parent / relative)), beside)
            if isinstance(hashed, Problem):
                return Problem(hashed.reason, f"row {row['id']} {column}: {hashed.detail}", loc)
            sample_id, size = hashed
        else:
            if len(data) > self.limits.max_bytes:
                return Problem("too_large", f"row {row['id']} {column} holds {len(data)} bytes, over "
                               f"--max-bytes {self.limits.max_bytes}", loc)
            sample_id, size = hash_bytes(data), len(data)
        return Candidate(sample_id, size, loc, 1, canonical(original), group, row["positive_prompt"],
                         split, original)

    def _real_index(self) -> RealImageIndex | None:
        if self.real_images is not None and self._index is None:
            self._index = RealImageIndex(self.real_images, self.cache, self._fingerprint())
        return self._index

    def _real_sample(self, row: dict, url_col: str, group: str, index: RealImageIndex | None, uri: str,
                     global_row: int, split: str | None) -> Iterator[Item]:
        url = row.get(url_col)
        loc = index.find(row["id"], url) if index is not None else None
        if loc is None:
            why = "no --real-images given" if index is None else "not found in --real-images"
            yield Problem(
                REAL_MISSING,
                f"row {row['id']}: real image {url or '(no url)'} {why}",
                Location(uri=uri, member=url_col, row=global_row),
            )
            return
        yield self._real_candidate(loc, row["id"], row["original_prompt"], group, split)

    def _real_candidate(self, loc: Location, row_id: object, text: str | None, group: str,
                        split: str | None) -> Item:
        hashed = hash_location(loc, self.limits)
        if isinstance(hashed, Problem):
            return Problem(hashed.reason, f"row {row_id}: {hashed.detail}", loc)
        return Candidate(hashed[0], hashed[1], loc, 0, REAL, group, text, split, None)

    def recheck(self, missing: pa.RecordBatch) -> Iterator[Item | Resolved]:
        """Look up again the rows quarantined as `real_image_missing` (`source_uri`,
        `source_member`, `source_row`, sorted by file): for each now found, a `Resolved` and then
        its sample (or the problem its image has). Reads only the id, URL and caption columns of
        the row groups that hold them; rows of files no longer given, or not there, are left."""
        index = self._real_index() if missing.num_rows else None
        if index is None:
            return
        files = {absolute(p): p for p in self.files}
        uris = missing.column("source_uri")
        bounds = [0] + [i for i in range(1, len(uris)) if uris[i] != uris[i - 1]] + [len(uris)]
        for begin, end in zip(bounds, bounds[1:], strict=False):
            part = missing.slice(begin, end - begin)
            uri = part.column("source_uri")[0].as_py()
            if uri in files:
                yield from self._recheck_file(files[uri], uri, part, index)

    def _recheck_file(self, path: Path, uri: str, part: pa.RecordBatch, index: RealImageIndex
                      ) -> Iterator[Item | Resolved]:
        try:
            pf = pq.ParquetFile(path)
        except Exception:  # noqa: BLE001 - unreadable now: its next read (it changed) says why
            return
        names = set(pf.schema_arrow.names)
        try:
            _check_types(path, pf.schema_arrow, next((c for c in _URL_COLUMNS if c in names), None))
        except PipelineError:
            return  # refused at its next read, with the reason
        ends = [0]
        for i in range(pf.metadata.num_row_groups):
            ends.append(ends[-1] + pf.metadata.row_group(i).num_rows)
        split = split_from_path(path)
        for member in set(part.column("source_member").to_pylist()):
            if member not in _URL_COLUMNS or member not in names or not {"id", "original_prompt"} <= names:
                continue
            rows = part.filter(pc.equal(part.column("source_member"), member)).column("source_row").to_pylist()
            groups = sorted({bisect_right(ends, r) - 1 for r in rows if r is not None and 0 <= r < ends[-1]})
            if not groups:
                continue
            try:
                table = pf.read_row_groups(groups, columns=["id", member, "original_prompt"])
            except Exception:  # noqa: BLE001 - a damaged file: left as it is
                continue
            first, taken = {}, 0  # where each row group read begins in `table`
            for g in groups:
                first[g], taken = taken, taken + ends[g + 1] - ends[g]
            ids, urls, texts = (table.column(c).to_pylist() for c in ("id", member, "original_prompt"))
            for r in rows:
                if r is None or not 0 <= r < ends[-1]:
                    continue
                group_index = bisect_right(ends, r) - 1
                at = first[group_index] + r - ends[group_index]
                loc = index.find(ids[at], urls[at])
                if loc is None:
                    continue
                yield Resolved(REAL_MISSING, f"row {ids[at]}: real image {urls[at] or '(no url)'} found in "
                               f"--real-images since", Location(uri=uri, member=member, row=r))
                yield self._real_candidate(loc, ids[at], texts[at], f"d3:{ids[at]}", split)

    # --- webdataset form ---

    def _webdataset(self, tar: Path, start: int) -> Items:
        try:
            return (yield from self._webdataset_entries(tar, start))
        except DamagedArchive as exc:
            yield archive_problem(tar, exc)
            return None

    def _webdataset_entries(self, tar: Path, start: int) -> Items:
        entries = Returning(iter_tar_entries(tar, start))
        for tf, entry in entries:
            caption = tar_text(tf, entry, "caption.txt")
            prompt = tar_text(tf, entry, "prompt.txt") or caption
            row_id, split = parse_key(entry.key.rpartition("/")[2])
            group = f"d3:{row_id}"
            slots = [("real", 0, REAL, caption)] + [
                (f"gen_{k}", 1, self.generators[k] if k < len(self.generators) else f"gen{k}", prompt)
                for k in range(NUM_GENERATED)
            ]
            for name, label, generator, text in slots:
                member = image_member(entry, name)
                if member is None:
                    yield Problem(
                        "real_image_missing" if label == 0 else "image_missing",
                        f"key {entry.key}: no {name} image in {tar.name}",
                        Location(uri=absolute(tar), member=f"{entry.key}.{name}"),
                    )
                    continue
                got = tar_candidate_or_problem(tar, tf, member, self.limits)
                if isinstance(got, Problem):
                    yield got
                    continue
                sample_id, size, loc = got
                yield Candidate(sample_id, size, loc, label, generator, group, text, split,
                                None if label == 0 else name)
        return entries.value


def _check_types(path: Path, schema: pa.Schema, url_col: str | None) -> None:
    """Refuse, in one sentence naming the column, a D3 Parquet file whose texts are not one string
    per row (a list of prompts: which one made the images is unknown) or whose images are neither
    plain binary nor the Hugging Face image struct {bytes, path}. Columns it lacks are not looked at."""
    kinds = {field.name: field.type for field in schema}
    if "id" in kinds and pa.types.is_nested(kinds["id"]):
        raise PipelineError(f"{path} is not in the D3 layout: its column id holds {kinds['id']}, not one id per row.")
    for name in ["original_prompt", "positive_prompt", *([url_col] if url_col else []),
                 *(f"model_gen{k}" for k in range(NUM_GENERATED))]:
        kind = kinds.get(name, pa.null())
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            raise PipelineError(f"{path} is not in the D3 layout: its column {name} holds {kind}, not one "
                                "text per row.")
    for k in range(NUM_GENERATED):
        kind = kinds.get(f"image_gen{k}", pa.null())
        if not (_is_binary(kind) or pa.types.is_null(kind) or (pa.types.is_struct(kind) and _image_struct(kind))):
            raise PipelineError(f"{path} is not in the D3 layout: its column image_gen{k} holds {kind}, not image "
                                "bytes (binary, or the Hugging Face image struct {bytes, path}).")


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)


def _image_struct(kind: pa.StructType) -> bool:
    """{bytes: binary, path: string}, either field optional but not both."""
    fields = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
    raw, where = fields.get("bytes"), fields.get("path")
    return (raw is not None or where is not None) and (raw is None or _is_binary(raw) or pa.types.is_null(raw)) \
        and (where is None or pa.types.is_string(where) or pa.types.is_large_string(where) or pa.types.is_null(where))


def _row_group_spans(meta: pq.FileMetaData) -> list[tuple[int, int, int]]:
    """(first byte, end byte, rows up to its end) of each row group."""
    spans = []
    rows = 0
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        begin, end = None, 0
        for j in range(group.num_columns):
            column = group.column(j)
            first = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
            begin = first if begin is None else min(begin, first)
            end = max(end, first + column.total_compressed_size)
        rows += group.num_rows
        spans.append((begin or 0, end, rows))
    return spans


def parse_key(key: str) -> tuple[str, str | None]:
    """`elsa_v2__train__<id>` → (`<id>`, `train`); a bare `<id>` → (`<id>`, None)."""
    parts = key.split("__")
    if len(parts) >= 3:
        return parts[-1], _SPLIT_NAMES.get(parts[-2].lower())
    return parts[-1], None


def split_from_path(path: Path) -> str | None:
    """The split a D3 Parquet file declares by its name or folder (`validation-0000….parquet`, `test/`)."""
    for part in (path.stem, path.parent.name):
        match = _SPLIT_IN_NAME.search(part.lower())
        if match:
            return _SPLIT_NAMES[match.group(1)]
    return None
