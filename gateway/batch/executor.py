"""Runs batches: each line is sent, as an ordinary HTTP request, to a gateway's own listener — this process in role
`all`, the proxy tier in the chart — with a credential that makes it a request of the batch's owner in the flex
band (gateway/access/delegation.py). So a line meets every check an online request meets (body limit, scopes,
model, media guard, the key's budgets) and waits in the same scheduler, behind all interactive work.

One task per running batch owns it: it reads the input a line at a time (never the whole file), keeps at most
`concurrency` lines in flight, and commits each result before the line counts as done (gateway/batch/store.py).
A line answered 429 or 503 (the key's budget, a full queue, no replica yet) waits and is sent again — a batch slows
down instead of failing lines; a replica failure (502/504) or an unreachable gateway is retried a few times. A
cancel or the end of the completion window stops dispatch, abandons the lines in flight, and finalises with what
finished. After a crash every batch not yet final is started again and sends only the lines without a result
(a line in flight at the crash may have run upstream once already; its result is recorded once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from prometheus_client import Gauge

from gateway.access.delegation import Delegation
from gateway.batch.files import FileStorage
from gateway.batch.lines import Line, error_record, read_lines, request_id, response_record
from gateway.batch.protocol import derived_file_ids
from gateway.batch.store import BatchStore
from gateway.config import BatchSettings
from gateway.metrics import GatewayMetrics

log = logging.getLogger("gateway.batch")

WAIT_STATUSES = (429, 503)  # the key's budget, a full or timed-out queue, no replica up: wait, never fail
RETRY_STATUSES = (502, 504)
MAX_WAIT = 30.0  # the longest pause a Retry-After may ask for between two sends of a line
LINE_TIMEOUT = aiohttp.ClientTimeout(total=3600, sock_connect=10)


STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")


@dataclass(eq=False)
class Running:
    row: dict[str, Any]
    task: asyncio.Task[None] | None = None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    left: int = 0  # lines without a result, as counted in the pending gauge


class BatchExecutor:
    def __init__(
        self,
        store: BatchStore,
        storage: FileStorage,
        settings: BatchSettings,
        session: aiohttp.ClientSession,
        dispatch_url: str,
        delegation: Delegation,
        metrics: GatewayMetrics,
        max_line_bytes: int,
    ) -> None:
        self.store = store
        self.storage = storage
        self.settings = settings
        self.session = session
        self.dispatch_url = dispatch_url.rstrip("/")
        self.delegation = delegation
        self.metrics = metrics
        self.max_line_bytes = max_line_bytes
        self._running: dict[str, Running] = {}

    async def start(self) -> None:
        """Start every batch that is not final: a restart resumes them."""
        for row in await self.store.active():
            self.launch(row)
        await self.publish()

    def launch(self, row: dict[str, Any]) -> None:
        running = Running(row)
        self._running[row["id"]] = running
        running.task = asyncio.create_task(self._own(running), name=f"batch-{row['id']}")

    def cancel(self, batch_id: str) -> None:
        """The batch was moved to `cancelling`: its task stops dispatching and finalises."""
        running = self._running.get(batch_id)
        if running is not None:
            running.cancelled.set()

    async def stop(self) -> None:
        tasks = [r.task for r in self._running.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def publish(self) -> None:
        counts = await self.store.count_by_status()
        for status in STATUSES:
            self.metrics.of(self.metrics.batches, status).set(counts.get(status, 0))

    # -- one batch --------------------------------------------------------------------------------------------

    async def _own(self, running: Running) -> None:
        row = running.row
        batch_id = row["id"]
        try:
            if row["status"] == "validating":
                await self.store.move(batch_id, "in_progress", when="in_progress_at")
                await self.publish()
            if row["status"] in ("validating", "in_progress"):
                outcome = await self._dispatch(running)
            else:
                outcome = "cancelled" if row["status"] == "cancelling" else "completed"
            if outcome == "completed" and not await self.store.move(
                batch_id, "finalizing", when="finalizing_at", only_from=("in_progress", "finalizing")
            ):
                outcome = "cancelled"  # cancelled as its last line finished
            await self._finalise(row, outcome)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s failed", batch_id)
            await self.store.move(batch_id, "failed", when="failed_at", errors=[_error("internal_error", "")])
        finally:
            self._running.pop(batch_id, None)
            with contextlib.suppress(Exception):
                await self.publish()

    async def _dispatch(self, running: Running) -> str:
        """Send every line without a result; 'completed', 'cancelled' or 'expired', by what ended it."""
        row = running.row
        done = await self.store.done_lines(row["id"])
        pending = self.metrics.of(self.metrics.batch_lines_pending, row["model"])
        running.left = row["total"] - len(done)
        pending.inc(running.left)
        slots = asyncio.Semaphore(self.settings.concurrency)
        in_flight: set[asyncio.Task[None]] = set()
        lines = read_lines(self.storage.path(row["input_file_id"]), row["endpoint"], self.max_line_bytes, done)

        reading: list[asyncio.Future[Line | None]] = []  # the read in a thread now, if any

        async def feed() -> None:
            while True:
                reading[:] = [asyncio.ensure_future(asyncio.to_thread(_next, lines))]
                line = await asyncio.shield(reading[0])  # a cancel leaves the read to finish in its thread
                if line is None:
                    break
                await slots.acquire()
                task = asyncio.create_task(self._line(running, line, slots, pending))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            await asyncio.gather(*in_flight)

        feeder = asyncio.create_task(feed())
        cancel = asyncio.ensure_future(running.cancelled.wait())
        try:
            finished, _ = await asyncio.wait(
                {feeder, cancel}, timeout=max(row["expires_at"] - time.time(), 0), return_when=asyncio.FIRST_COMPLETED
            )
            if feeder in finished:
                feeder.result()
                return "completed"
            return "cancelled" if cancel in finished else "expired"
        finally:
            for task in (feeder, cancel, *in_flight):
                task.cancel()  # a line's connection closes: the gateway sees its client leave, vLLM aborts it
            await asyncio.gather(feeder, *in_flight, return_exceptions=True)
            # A cancelled feeder may leave its read running in the thread; the file closes once that read is over.
            await asyncio.gather(*reading, return_exceptions=True)
            await asyncio.to_thread(lines.close)
            pending.dec(running.left)

    async def _line(self, running: Running, line: Line, slots: asyncio.Semaphore, pending: Gauge) -> None:
        row = running.row
        try:
            ok, record = await self._send(row, line)
            if await self.store.record(row["id"], line.number, ok, record):
                running.left -= 1
                pending.dec()
                self.metrics.of(self.metrics.batch_lines, row["model"], "completed" if ok else "failed").inc()
        finally:
            slots.release()

    async def _send(self, row: dict[str, Any], line: Line) -> tuple[bool, bytes]:
        body = line.body
        if row["endpoint"] != "/v1/embeddings":
            body = {**body, "service_tier": "flex"}
        payload = orjson.dumps(body)
        url = f"{self.dispatch_url}{row['endpoint']}"
        failures = 0
        while True:
            request = request_id()
            headers = {
                "Authorization": f"Bearer {self.delegation.mint(row['owner'], row['id'])}",
                "Content-Type": "application/json",
                "X-Request-Id": request,
            }
            try:
                async with self.session.post(url, data=payload, headers=headers, timeout=LINE_TIMEOUT) as answer:
                    status = answer.status
                    retry_after = answer.headers.get("Retry-After")
                    answer_body = await _bounded(answer, self.max_line_bytes)
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures += 1
                if failures >= self.settings.max_attempts:
                    return False, error_record(line.custom_id, "gateway_unreachable", type(exc).__name__)
                await self._pause(row, min(2.0**failures, MAX_WAIT))
                continue
            if answer_body is None:
                return False, error_record(line.custom_id, "response_too_large", "The answer exceeded the line cap.")
            if status in WAIT_STATUSES:
                await self._pause(row, _seconds(retry_after))
                continue
            if status in RETRY_STATUSES:
                failures += 1
                if failures < self.settings.max_attempts:
                    await self._pause(row, min(2.0**failures, MAX_WAIT))
                    continue
            return 200 <= status < 300, response_record(line.custom_id, status, request, answer_body)

    async def _pause(self, row: dict[str, Any], seconds: float) -> None:
        self.metrics.of(self.metrics.batch_line_retries, row["model"]).inc()
        await asyncio.sleep(seconds)

    # -- the end ----------------------------------------------------------------------------------------------

    async def _finalise(self, row: dict[str, Any], outcome: str) -> None:
        """Write the output and error files and move the batch to `outcome` (completed, cancelled or expired)."""
        output_id, error_id = derived_file_ids(row["id"])
        input_path = self.storage.path(row["input_file_id"])
        unfinished = 0  # lines an expiry left without a result, written to the error file as expired

        def write(results: Iterator[tuple[int, bool, bytes]]) -> dict[str, Any]:
            nonlocal unfinished
            done: set[int] = set()
            failed: list[bytes] = []

            def succeeded() -> Iterator[bytes]:
                for number, ok, record in results:
                    done.add(number)
                    if ok:
                        yield record
                    else:
                        failed.append(record)  # error records are small: no response body beyond an error

            now = int(time.time())
            size = self.storage.write_lines(output_id, succeeded())
            written: dict[str, Any] = {"output": _file_row(output_id, row, size, now)}
            if outcome == "expired":
                expired = [
                    error_record(line.custom_id, "batch_expired", "The batch expired before this request ran.")
                    for line in read_lines(input_path, row["endpoint"], self.max_line_bytes, done)
                ]
                unfinished = len(expired)
                failed += expired
            if failed:
                size = self.storage.write_lines(error_id, failed)
                written["error"] = _file_row(error_id, row, size, now)
            written["unfinished"] = unfinished
            return written

        final = await self.store.finish(row["id"], outcome, f"{outcome}_at", write)
        if unfinished:
            self.metrics.of(self.metrics.batch_lines, row["model"], "expired").inc(unfinished)
        log.info("batch %s %s: %d completed, %d failed", row["id"], outcome, final["completed"], final["failed"])


def _next(lines: Generator[Line, None, None]) -> Line | None:
    return next(lines, None)


async def _bounded(answer: aiohttp.ClientResponse, limit: int) -> bytes | None:
    body = bytearray()
    async for chunk in answer.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _seconds(retry_after: str | None) -> float:
    try:
        return min(max(float(retry_after or 1), 0.5), MAX_WAIT)
    except ValueError:
        return 1.0


def _error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message or "The batch could not be run.", "param": None, "line": None}


def _file_row(file_id: str, batch: dict[str, Any], size: int, now: int) -> dict[str, Any]:
    return {
        "id": file_id,
        "namespace": batch["namespace"],
        "owner": batch["owner"],
        "purpose": "batch_output",
        "filename": f"{batch['id']}_{'output' if file_id.endswith('o') else 'error'}.jsonl",
        "bytes": size,
        "created_at": now,
    }
