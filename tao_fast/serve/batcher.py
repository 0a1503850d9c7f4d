"""The micro-batcher: requests waiting together go to the engine in one generate() call.

One thread owns the engine (the torch engine is not thread-safe: one generation at a time).
Requests are submitted from the event loop as (key, prompt ids) and get a
concurrent.futures.Future; the thread takes the oldest waiting request and every other
waiting one with the same key (the same SamplingParams: one generate() call has one), up to
max_batch prompts, and runs them together. While a batch runs, new requests queue; they form
the next batch, so under load batches fill by themselves and an idle server adds no delay.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field


@dataclass
class _Item:
    key: tuple
    prompt: list[int]
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """run_batch(key, prompts) -> one result per prompt, called in this batcher's thread."""

    def __init__(self, run_batch, *, max_batch: int = 8, name: str = "tao-serve-batcher"):
        self.run_batch, self.max_batch = run_batch, max(1, int(max_batch))
        self._q: queue.Queue = queue.Queue()
        self._pending: list[_Item] = []
        self._stop = threading.Event()
        self.batches = self.requests = 0  # counters, for the tests and the benchmark
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: tuple, prompt: list[int]) -> Future:
        """Queue one prompt; its Future gets run_batch's result for it (or its exception)."""
        item = _Item(key, prompt)
        if self._stop.is_set():
            item.future.set_exception(RuntimeError("the model is shutting down"))
        else:
            self._q.put(item)
        return item.future

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop after the batch running now; requests still waiting fail."""
        self._stop.set()
        self._q.put(None)
        self._thread.join(timeout_s)
        for item in self._pending + self._drain():
            if not item.future.done():
                item.future.set_exception(RuntimeError("the model was shut down"))

    def _drain(self) -> list[_Item]:
        items = []
        while True:
            try:
                it = self._q.get_nowait()
            except queue.Empty:
                return items
            if it is not None:
                items.append(it)

    def _next_batch(self) -> list[_Item]:
        """The oldest waiting request and the others with its key, up to max_batch."""
        if not self._pending:
            it = self._q.get()
            if it is None:
                return []
            self._pending.append(it)
        self._pending += self._drain()
        key = self._pending[0].key
        batch = [it for it in self._pending if it.key == key][:self.max_batch]
        taken = set(map(id, batch))
        self._pending = [it for it in self._pending if id(it) not in taken]
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if not batch:
                continue
            self._run(batch)

    def _run(self, batch: list[_Item]) -> None:
        """One generate() call for the batch; its exception goes to every request of it.
        Requests cancelled while waiting (their client went away) are left out."""
        batch = [it for it in batch if it.future.set_running_or_notify_cancel()]
        if not batch:
            return
        self.batches += 1
        self.requests += len(batch)
        try:
            results = self.run_batch(batch[0].key, [it.prompt for it in batch])
        except BaseException as e:  # noqa: BLE001 - the requests' error, not the thread's
            for it in batch:
                it.future.set_exception(e)
            return
        for it, r in zip(batch, results):
            it.future.set_result(r)
