"""Batcher edge timing, in process with a stand-in encode function (the real encoder is tested end to end)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from gateway.embeddings.batcher import Batcher
from gateway.errors import RateLimited, ServiceUnavailable
from gateway.metrics import GatewayMetrics


class OutOfMemoryError(RuntimeError):
    """Named like torch's, which is how the batcher recognises it."""


class Encode:
    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.fail_next: BaseException | None = None
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[Any]) -> np.ndarray:
        self.gate.wait(5)
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        self.batches.append(list(items))
        return np.array([[float(x), 1.0] for x in items], np.float32)


@pytest.fixture
async def setup() -> Any:
    encode = Encode()
    device = ThreadPoolExecutor(1)
    batcher = Batcher("text", encode, device, GatewayMetrics(), max_batch=8, max_wait=0.005, max_queue=16)
    batcher.start()
    yield batcher, encode
    await batcher.close()
    device.shutdown()


async def test_concurrent_callers_are_merged_and_answered_in_order(setup: Any) -> None:
    batcher, encode = setup
    encode.gate.clear()  # hold the device so callers pile up behind the first batch
    first = asyncio.create_task(batcher.submit([0]))
    await asyncio.sleep(0.02)
    rest = [asyncio.create_task(batcher.submit([i, i + 100])) for i in range(1, 5)]
    await asyncio.sleep(0.02)
    encode.gate.set()
    assert (await first)[:, 0].tolist() == [0]
    for i, task in enumerate(rest, start=1):
        assert (await task)[:, 0].tolist() == [i, i + 100]
    assert len(encode.batches) == 2 and len(encode.batches[1]) == 8


async def test_out_of_memory_fails_the_batch_with_503_and_the_worker_keeps_serving(setup: Any) -> None:
    batcher, encode = setup
    encode.fail_next = OutOfMemoryError("CUDA out of memory")
    with pytest.raises(ServiceUnavailable, match="out of memory"):
        await batcher.submit([1, 2])
    assert (await batcher.submit([3]))[:, 0].tolist() == [3]


async def test_full_queue_is_refused_whole(setup: Any) -> None:
    batcher, encode = setup
    encode.gate.clear()
    held = asyncio.create_task(batcher.submit([0]))
    await asyncio.sleep(0.02)
    queued = asyncio.create_task(batcher.submit(list(range(10))))
    await asyncio.sleep(0.01)
    with pytest.raises(RateLimited) as caught:
        await batcher.submit(list(range(7)))  # 10 waiting + 7 > 16
    assert caught.value.headers == {"Retry-After": "1"}
    encode.gate.set()
    await held
    assert len(await queued) == 10


async def test_cancelled_callers_are_skipped(setup: Any) -> None:
    batcher, encode = setup
    encode.gate.clear()
    held = asyncio.create_task(batcher.submit([0]))
    await asyncio.sleep(0.02)
    gone = asyncio.create_task(batcher.submit([7, 8, 9]))
    stays = asyncio.create_task(batcher.submit([5]))
    await asyncio.sleep(0.01)
    gone.cancel()
    encode.gate.set()
    await held
    assert (await stays)[:, 0].tolist() == [5]
    assert [7, 8, 9] not in [b[:3] for b in encode.batches] and all(7 not in b for b in encode.batches)


async def test_a_dead_worker_fails_its_waiters_and_is_restarted(setup: Any) -> None:
    batcher, _encode = setup
    original = batcher._collect
    calls = 0

    async def broken() -> Any:
        nonlocal calls
        calls += 1
        items = await original()
        if calls == 1:
            batcher._in_batch = items
            raise RuntimeError("bug in the worker loop")
        return items

    batcher._collect = broken
    # The worker is already parked in the original _collect; the patched one runs from its next turn.
    assert (await batcher.submit([0]))[:, 0].tolist() == [0]
    with pytest.raises(ServiceUnavailable, match="restarted"):
        await batcher.submit([1])
    assert (await batcher.submit([2]))[:, 0].tolist() == [2]
