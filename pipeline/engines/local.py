"""The local engine: encode's units of work in this process, with decoding in worker processes.

It reads the pending rows in batches from the job's Parquet file (never the whole list), runs
`DecodeImages` in DataLoader workers (with none, in a thread one batch ahead) and
`EncodeImages`/`EncodeTexts` here, writes complete staged shards and, as the holder of the store's
writer lock, commits them a few at a time. A kill leaves only staged shards, which the next writer
adopts: nothing lost, nothing doubled.

On a GPU the host work (receiving decoded pictures, building and writing rows) must hide behind the
forward pass: pictures come from the workers as uint8 tensors in shared memory, are page-locked by
DataLoader's pin-memory thread, and each batch's pass is queued before the previous batch is read
back, so the GPU always has the next batch.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import shutil
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.ahead import in_thread
from pipeline.children import die_with
from pipeline.encoding.clip import LoadedModel
from pipeline.encoding.jobs import EncodeJob, JobResult, stage_encoded
from pipeline.encoding.units import (
    Decoded,
    DecodeImages,
    EncodeImages,
    EncodeTexts,
    default_workers,
    resolve_device,
)
from pipeline.reporting import Reporter
from pipeline.store.writes import Committer
from trainer.threads import choose_threads

PREFETCH = 2  # decoded batches each worker keeps ready (they wait in shared memory)


class LocalEngine:
    """Runs a job here: DecodeImages in `workers` processes, the model in this one."""

    def __init__(self, workers: int | None = None, loaded: LoadedModel | None = None) -> None:
        self.workers = workers
        self.loaded = loaded  # a model the caller already loaded (to learn its key): reuse it

    def run(self, job: EncodeJob, reporter: Reporter) -> JobResult:
        batches: Generator[Any, None, None]
        if job.modality == "text":
            batches = pending_batches(job.pending, job.batch_size)
        else:  # the workers start first: they decode while the model is built
            device = resolve_device(job.spec.device)
            workers = default_workers(device) if self.workers is None else self.workers
            batches = _decoded(job, workers, pin=device.type == "cuda")
        # closing ends the decoding workers, also on an error
        with contextlib.closing(batches), model_threads(job.spec.device):
            return self._run(job, batches, reporter)

    def _run(self, job: EncodeJob, batches: Iterator[Any], reporter: Reporter) -> JobResult:
        result = JobResult()
        unit: EncodeImages | EncodeTexts
        if job.modality == "text":
            unit = EncodeTexts(job.spec, self.loaded)
        else:
            unit = EncodeImages(job.spec, self.loaded)
        result.device = str(unit.encoder.device)
        reporter.start(f"{job.modality}s", job.rows, "img" if job.modality == "image" else "texts")
        committer = Committer(job.store)
        buffer: list[pa.Table] = []
        started = time.perf_counter()
        for encoded in _one_ahead(unit, batches):
            result.count(encoded)
            reporter.advance(f"{job.modality}s", encoded.num_rows)
            buffer.append(encoded)
            if sum(t.num_rows for t in buffer) >= job.shard_rows:
                committer.add(stage_encoded(job.store, job.spec, pa.concat_tables(buffer)))
                buffer = []
        if buffer:
            committer.add(stage_encoded(job.store, job.spec, pa.concat_tables(buffer)))
        committer.flush()
        result.shards = committer.committed
        result.seconds = time.perf_counter() - started
        result.forward_passes = (unit.encoder.image_forward_passes if job.modality == "image"
                                 else unit.encoder.text_forward_passes)
        return result

    def close(self) -> None:
        """Nothing to release: the model goes with the engine."""


@contextlib.contextmanager
def model_threads(device: str) -> Iterator[None]:
    """On the CPU, the model runs on the cores other processes leave idle (`trainer.threads`' policy),
    at most the threads torch had; the count is restored afterwards. On a shared machine two threads
    contending for one free core spin at every operation's barrier: ViT-B-32 in bf16 measured 40-49
    images per CPU-second on one thread against 19-20 on two (bench/bench_encode.py --threads)."""
    if resolve_device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(choose_threads(limit=previous)[0])
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pending_batches(
    path: Path, batch_size: int, shard: int = 0, shards: int = 1
) -> Generator[pa.Table, None, None]:
    """Batches of the pending file, read in order (every `shards`-th batch from `shard`)."""
    for i, batch in enumerate(pq.ParquetFile(path).iter_batches(batch_size=batch_size)):
        if i % shards == shard:
            yield pa.Table.from_batches([batch])


def _one_ahead(unit: EncodeImages | EncodeTexts, batches: Iterator[Any]) -> Iterator[pa.Table]:
    """The units' rows, batch after batch; each batch's forward pass is queued before the previous
    one is read back, so a GPU computes while this process turns results into rows and shards."""
    waiting = None
    for batch in batches:
        started = unit.start(batch)
        if waiting is not None:
            yield unit.finish(waiting)
        waiting = started
    if waiting is not None:
        yield unit.finish(waiting)


def _decoded(job: EncodeJob, workers: int, pin: bool) -> Generator[Decoded, None, None]:
    return decoded_batches(job.pending, job.batch_size, DecodeImages(job.spec), workers, pin)


def decoded_batches(pending: Path, batch_size: int, decode: DecodeImages, workers: int,
                    pin: bool) -> Generator[Decoded, None, None]:
    """The batches of a pending-rows file, each through `decode` (a `DecodeImages`, or a unit built on it
    such as predict's `IdentifyImages`: picklable, no model), in `workers` processes (0: in a thread of
    this process, one batch ahead), in order."""
    if workers == 0:
        # one batch ahead in a thread: why and what it measured, see `default_workers`
        return in_thread((decode.decode(b) for b in pending_batches(pending, batch_size)), 1, "decode-ahead")
    # forkserver, not fork: a forked worker would inherit the writer lock's descriptor and, orphaned
    # by a killed run, keep the store locked. The server imports this module once and the workers
    # fork from it ready, instead of each importing torch and pyarrow (seconds each when 15 start at
    # once); only the first server a process starts takes the list.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])
    picture_bytes = int(np.prod(decode.spec.picture_shape)) * batch_size
    loader = torch.utils.data.DataLoader(
        _DecodedBatches(pending, batch_size, decode, _fits_in_shared_memory(workers * (PREFETCH + 1) * picture_bytes)),
        batch_size=None, num_workers=workers, prefetch_factor=PREFETCH, pin_memory=pin,
        worker_init_fn=functools.partial(_worker_init, os.getpid()), collate_fn=_identity,
        multiprocessing_context=context,
    )
    return _owning(iter(loader))  # iter() starts the workers now


def _owning(batches: Iterator[Decoded]) -> Generator[Decoded, None, None]:
    """Yield from `batches`, holding the only reference to it: closing this ends its workers."""
    yield from batches


def _fits_in_shared_memory(nbytes: int) -> bool:
    """Whether /dev/shm can hold the decoded batches in flight (a container's default is 64 MB);
    if not, the workers send their pictures through the pipe instead: slower, but it runs."""
    try:
        return shutil.disk_usage("/dev/shm").free >= nbytes
    except OSError:  # no /dev/shm (macOS): torch shares memory another way
        return True


class _DecodedBatches(torch.utils.data.IterableDataset):
    """Worker k of n decodes every n-th batch of the pending file, from the k-th."""

    def __init__(self, pending: Path, batch_size: int, decode: DecodeImages, shared_memory: bool) -> None:
        self.pending, self.batch_size, self.decode = pending, batch_size, decode
        self.shared_memory = shared_memory

    def __iter__(self) -> Iterator[Decoded]:
        info = torch.utils.data.get_worker_info()
        shard, shards = (info.id, info.num_workers) if info else (0, 1)
        for batch in pending_batches(self.pending, self.batch_size, shard, shards):
            decoded = self.decode.decode(batch)
            if self.shared_memory:  # a tensor crosses to the main process in shared memory, not pickled
                decoded = Decoded(decoded.rows, torch.from_numpy(decoded.pictures), decoded.ok)
            yield decoded


def _identity(batch: Any) -> Any:
    return batch


def _worker_init(owner: int, _: int) -> None:
    # A worker is forked by the forkserver, not by `owner`: it must end when `owner` does, or it and
    # the forkserver (which waits for its workers) run on, orphaned, after a kill (575 MB measured).
    die_with(owner)
    torch.set_num_threads(1)  # decoding workers must not compete with the model's threads
