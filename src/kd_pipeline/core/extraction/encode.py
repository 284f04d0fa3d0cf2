"""Encoding artifact payloads off the main thread while the teacher runs."""

from __future__ import annotations


class PrecomputedCodec:
    """Wraps a codec so that `TopKShardWriter.add` picks up payloads encoded ahead of time in a
    thread pool (same codec, same arrays: the same bytes), in submission order."""

    def __init__(self, codec, workers: int):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.inner = codec
        self.name = codec.name
        self.columns = codec.columns
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="topk-encode")
        self._queue = deque()

    def settings(self) -> dict:
        return self.inner.settings()

    def columns_for(self, mode: str = "topk") -> tuple[str, ...]:
        return self.inner.columns_for(mode)

    def submit(self, arrays) -> None:
        self._queue.append((arrays.num_positions, self._pool.submit(self.inner.encode, arrays)))

    def encode(self, sample):
        num_positions, future = self._queue.popleft()
        if num_positions != sample.num_positions:  # a programming error, never data-dependent
            raise RuntimeError("encode queue out of order")
        return future.result()

    def decode(self, payload, num_positions: int, k: int, logz_scales: tuple[float, ...] = (), mode: str = "topk"):
        return self.inner.decode(payload, num_positions, k, logz_scales, mode)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
