"""Work on a helper thread beside the main loop: one producer ahead of it, one consumer behind it.

Used to overlap tokenizing, device work and writing (extract) and to prepare training batches
while the GPU computes. Both keep order, bound memory by a queue depth, and hand an exception of
the thread to the main loop instead of losing it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

_END = object()


class Prefetch(Iterator):
    """Iterate `items` on a daemon thread, up to `depth` items ahead of the consumer.

    An exception raised while producing reaches the consumer where the next item would have been.
    `close()` stops the producer at its next item and waits for it.
    """

    def __init__(self, items: Iterable, depth: int = 2, name: str = "mlsm-prefetch"):
        self._items = iter(items)
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self._items:
                if not self._put((item, None)):
                    return
            self._put((_END, None))
        except BaseException as e:  # handed to the consumer, raised there
            self._put((None, e))

    def __next__(self):
        if self._done:
            raise StopIteration
        item, err = self._q.get()
        if err is not None:
            self._done = True
            raise err
        if item is _END:
            self._done = True
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Drain:
    """Run `fn(item)` on a daemon thread for every `put(item)`, in order, at most `depth` waiting.

    An exception of `fn` is raised by the next `put` or by `close`; after it, items are dropped.
    `close()` waits until every item handed over is done, so finished work is never lost.
    """

    def __init__(self, fn: Callable, depth: int = 2, name: str = "mlsm-drain"):
        self._fn = fn
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (item := self._q.get()) is not _END:
            if self._error is None:
                try:
                    self._fn(item)
                except BaseException as e:  # raised in the main thread
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, item) -> None:
        self._raise()
        while True:
            try:
                self._q.put(item, timeout=0.2)
                return
            except queue.Full:
                self._raise()

    def close(self) -> None:
        """Finish what was handed over, stop the thread, and raise its error if it had one."""
        self._q.put(_END)
        self._thread.join()
        self._raise()
