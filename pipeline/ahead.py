"""Work made ahead in a thread: the items of an iterator, produced while the caller uses the last one.

The trainer's loader reads and shuffles the next batches this way while a step runs; encode and predict
decode the next batch of pictures while the model runs the last one (with no decoding processes). It
pays where the producer releases the GIL (Parquet reads, Pillow decoding, numpy and torch kernels) and
the consumer leaves the cores idle some of the time (torch's threads wait at every operation's barrier).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def in_thread(source: Iterator[T], depth: int = 1, name: str = "ahead") -> Generator[T, None, None]:
    """The items of `source`, produced up to `depth` ahead by a thread named `name` (started at the first
    item asked for); its errors are raised here, in order. Leaving early (this generator closed) stops
    the thread after the item it is making and closes `source` in it."""
    ready: queue.Queue[tuple[str, Any]] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put(("item", item)):
                    break
            else:
                put(("done", None))
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, raised there)
            put(("error", exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            kind, item = ready.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
