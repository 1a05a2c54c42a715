"""An asyncio batcher that owns the model: bounded queue, max batch size, max queue delay, k per batch.

Requests wait in one FIFO queue. The loop takes the oldest request, then waits
until the batch is full (``max_batch_size`` texts) or the oldest has waited
``max_queue_delay_ms``, asks the policy for this batch's k, and runs the model
in a worker thread, so the event loop keeps accepting requests meanwhile. A
request's texts stay in one batch; a full queue raises ``QueueFull`` (the
server answers 503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import time
from typing import Any, Callable, Sequence


class QueueFull(Exception):
  """The queue holds ``max_queue`` texts already."""


@dataclasses.dataclass
class Pending:
  items: Sequence[Any]            # the request's tokenized texts
  bucket: int                     # the length bucket its longest text needs
  arrival: float                  # clock time the request arrived
  future: asyncio.Future


@dataclasses.dataclass
class BatchResult:
  """What one request gets back: its outputs and the batch's k and timings."""
  outputs: Any
  k: float
  batch_size: int
  queue_s: float                  # arrival to the start of its batch
  compute_s: float                # the model call, timed in the worker thread


# run(items, bucket, k) -> one output per item, in order (called in the worker thread)
RunFn = Callable[[list, int, float], Sequence[Any]]
# choose(bucket, batch size, oldest arrival, now, arrival of the next queued request or None,
#        texts queued behind the batch, at most a batch) -> k
ChooseFn = Callable[[int, int, float, float, "float | None", int], float]


class Batcher:
  """Batches requests for ``run`` under the batching knobs, choosing each batch's k with ``choose``."""

  def __init__(self, run: RunFn, choose: ChooseFn, *, max_batch_size: int = 16,
               max_queue_delay_ms: float = 5.0, max_queue: int = 256,
               clock: Callable[[], float] = time.monotonic,
               on_batch: Callable[[int, int, float, float], None] | None = None,
               on_done: Callable[[float, float], None] | None = None):
    """``on_batch(bucket, texts, k, model seconds)`` follows each batch; ``on_done(end-to-end ms,
    now)`` each request."""
    if max_batch_size < 1 or max_queue < max_batch_size or max_queue_delay_ms < 0:
      raise ValueError(f"need max_batch_size >= 1, max_queue >= max_batch_size and "
                       f"max_queue_delay_ms >= 0; got {max_batch_size}, {max_queue}, "
                       f"{max_queue_delay_ms}")
    self.run, self.choose, self.clock = run, choose, clock
    self.max_batch_size, self.max_queue = max_batch_size, max_queue
    self.max_queue_delay_s = max_queue_delay_ms / 1e3
    self.on_batch, self.on_done = on_batch, on_done
    self._queue: collections.deque[Pending] = collections.deque()
    self._queued_items = 0
    self._wake = asyncio.Event()
    self._idle = asyncio.Event()
    self._idle.set()
    self._task: asyncio.Task | None = None
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

  @property
  def depth(self) -> int:
    """Texts waiting in the queue (not counting the batch being computed)."""
    return self._queued_items

  def start(self) -> "Batcher":
    self._task = asyncio.get_running_loop().create_task(self._loop())
    return self

  async def submit(self, items: Sequence[Any], bucket: int, arrival: float | None = None) -> BatchResult:
    """Queues one request and returns its result, or raises QueueFull / ValueError."""
    if not items:
      raise ValueError("a request needs at least one text")
    if len(items) > self.max_batch_size:
      raise ValueError(f"at most {self.max_batch_size} texts per request (max_batch_size); "
                       f"got {len(items)}: split the request")
    if self._queued_items + len(items) > self.max_queue:
      raise QueueFull(f"queue full ({self._queued_items} of {self.max_queue} texts waiting)")
    future = asyncio.get_running_loop().create_future()
    self._queue.append(Pending(list(items), bucket, self.clock() if arrival is None else arrival,
                               future))
    self._queued_items += len(items)
    self._idle.clear()
    self._wake.set()
    return await future

  def _take(self) -> list[Pending]:
    """Pops the oldest requests that fit in one batch (whole requests, FIFO)."""
    batch, n = [], 0
    while self._queue and n + len(self._queue[0].items) <= self.max_batch_size:
      p = self._queue.popleft()
      batch.append(p)
      n += len(p.items)
    self._queued_items -= n
    return batch

  async def _fill(self) -> None:
    """Waits until a batch is full or the oldest request has waited max_queue_delay."""
    deadline = self._queue[0].arrival + self.max_queue_delay_s
    while self._queued_items < self.max_batch_size:
      remaining = deadline - self.clock()
      if remaining <= 0:
        return
      self._wake.clear()
      try:
        await asyncio.wait_for(self._wake.wait(), remaining)
      except asyncio.TimeoutError:
        return

  async def _loop(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      if not self._queue:
        self._idle.set()
        self._wake.clear()
        await self._wake.wait()
        continue
      await self._fill()
      batch = [p for p in self._take() if not p.future.cancelled()]
      if not batch:
        continue
      items = [x for p in batch for x in p.items]
      bucket = max(p.bucket for p in batch)
      start = self.clock()
      behind = self._queue[0].arrival if self._queue else None
      try:
        k = self.choose(bucket, len(items), batch[0].arrival, start, behind,
                        min(self._queued_items, self.max_batch_size))
        outputs, compute = await loop.run_in_executor(self._pool, self._timed, items, bucket, k)
      except Exception as e:  # the policy or model failed: the batch's requests get the error
        for p in batch:
          if not p.future.done():
            p.future.set_exception(e)
        continue
      end = self.clock()
      if self.on_batch is not None:
        self.on_batch(bucket, len(items), k, compute)
      i = 0
      for p in batch:
        out = outputs[i:i + len(p.items)]
        i += len(p.items)
        if self.on_done is not None:
          self.on_done(1e3 * (end - p.arrival), end)
        if not p.future.done():
          p.future.set_result(BatchResult(out, k, len(items), start - p.arrival, compute))

  def _timed(self, items, bucket, k):
    """Runs the model in the worker thread; returns its outputs and the seconds it took there."""
    t0 = self.clock()
    out = self.run(items, bucket, k)
    return out, self.clock() - t0

  async def drain(self) -> None:
    """Returns once the queue is empty and no batch is running."""
    while self._queue or not self._idle.is_set():
      await asyncio.sleep(0.005)

  async def stop(self) -> None:
    """Drains, then stops the loop and the worker thread."""
    await self.drain()
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except asyncio.CancelledError:
        pass
    self._pool.shutdown(wait=True)
