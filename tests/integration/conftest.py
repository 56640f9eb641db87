from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fake_upstream import FakeVllm


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
