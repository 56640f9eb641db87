from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.fake_upstream import FakeVllm
from tests.harness.redis_server import RedisServer


@pytest.fixture
async def fake_a() -> AsyncIterator[FakeVllm]:
    fake = await FakeVllm().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def fake_b() -> AsyncIterator[FakeVllm]:
    fake = await FakeVllm().start()
    yield fake
    await fake.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """Debian's redis-server on a free port, for what gateways share through Redis."""
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()
