"""create_app(settings): lifespan, routers, middleware and error handlers — nothing else."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from gateway.access.admission import Admission, memory_limit_bytes
from gateway.access.delegation import Delegation
from gateway.access.keys import KeyChecker
from gateway.access.limits import KeyLimiter, Limiter
from gateway.asgi import ASGIApp, ErrorRenderer, error_response
from gateway.batch import router as batch_router
from gateway.batch.executor import BatchExecutor
from gateway.batch.files import FileStorage
from gateway.batch.service import BatchService, models_check
from gateway.batch.store import BatchStore
from gateway.chat import router as chat_router
from gateway.chat.protocol import ChatCompletionRequest, CompletionRequest
from gateway.chat.retrieval import LocalRetriever, RemoteRetriever, Retriever
from gateway.chat.serving import CompletionsEndpoint, Generation
from gateway.config import Settings
from gateway.embeddings import router as embeddings_router
from gateway.embeddings.service import EmbeddingsService
from gateway.errors import GatewayError, error_for_status, validation_error
from gateway.media.service import MediaPreparer
from gateway.messages import router as messages_router
from gateway.messages.protocol import CountTokensRequest, MessagesRequest
from gateway.metrics import GatewayMetrics
from gateway.provided import Provided
from gateway.responses import router as responses_router
from gateway.responses.ids import ResponseIds
from gateway.responses.protocol import ResponsesRequest
from gateway.search import router as search_router
from gateway.search.service import SearchService
from gateway.server import adapters as adapters_router
from gateway.server import health, models, retrieval_proxy, ui
from gateway.server.hotpath import HotPathDispatch
from gateway.server.metrics_server import MetricsServer
from gateway.server.middleware import MULTIPART_OVERHEAD, GatewayMiddleware
from gateway.server.state import GatewayState
from gateway.tracing import Tracing
from gateway.upstream.client import UpstreamClient, create_session
from gateway.upstream.pool import Pools

log = logging.getLogger("gateway")


async def _on_gateway_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


async def _on_validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_error(exc.errors(), located_by_source=True))


async def _on_http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    messages = {404: "Unknown route.", 405: "Method not allowed on this route."}
    return error_response(error_for_status(exc.status_code, messages.get(exc.status_code)))


async def _on_unexpected(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return error_response(GatewayError())


async def _watch_keys_file(keys: KeyChecker, limiter: Limiter) -> None:
    while True:
        await asyncio.sleep(1.0)
        if keys.reload_if_changed():
            limiter.update_keys(keys.rate_limits)


def _response_ids(settings: Settings) -> ResponseIds:
    secret = settings.responses.id_secret
    if secret is None:
        return ResponseIds.with_random_secret(settings.responses.ttl)
    return ResponseIds(secret.get_secret_value().encode(), settings.responses.ttl)


def _retriever(settings: Settings, search: SearchService, upstream: UpstreamClient) -> Retriever:
    """Where a grounded chat searches: this process's index, or in role proxy the retrieval service."""
    if settings.role == "proxy" and settings.retrieval_url:
        return RemoteRetriever(settings.retrieval_url, upstream.session, settings.grounding_timeout)
    return LocalRetriever(search)


def _delegation(settings: Settings) -> Delegation:
    secret = settings.batch.secret
    return Delegation.with_random_secret() if secret is None else Delegation(secret.get_secret_value().encode())


def _dispatch_url(settings: Settings) -> str:
    """Where batch lines go: the configured proxy tier, or this gateway's own listener."""
    if settings.batch.dispatch_url:
        return settings.batch.dispatch_url
    host = "127.0.0.1" if settings.host in ("", "0.0.0.0", "::") else settings.host
    return f"http://[{host}]:{settings.port}" if ":" in host else f"http://{host}:{settings.port}"


def _batch_service(
    settings: Settings, upstream: UpstreamClient, delegation: Delegation, metrics: GatewayMetrics, pools: Pools
) -> BatchService:
    batch = settings.batch
    store = BatchStore(batch.dir / "batches.sqlite3")
    storage = FileStorage(batch.dir)
    executor = BatchExecutor(
        store,
        storage,
        batch,
        upstream.session,
        _dispatch_url(settings),
        delegation,
        metrics,
        settings.max_body_bytes,
    )
    embeddings = settings.embeddings.model_name() if settings.embeddings.enabled else None
    served = (lambda model, namespace: pools.get(model, namespace) is not None) if settings.models else None
    check = models_check(served, embeddings)
    return BatchService(batch, store, storage, executor, check, settings.max_body_bytes)


def _key_limiter(settings: Settings, keys: KeyChecker, metrics: GatewayMetrics) -> Limiter:
    local = KeyLimiter(settings.rate_limits, keys.rate_limits)
    if settings.rate_limits_redis_url is None:
        return local
    from gateway.access.redis_limits import SharedKeyLimiter

    # An in-flight slot outlives no request: the longest a request may take, plus a margin.
    longest = max((pool.timeouts.total for pool in settings.models), default=900.0)
    return SharedKeyLimiter(local, settings.rate_limits_redis_url, metrics, in_flight_ttl=int(longest) + 60)


def _drain_on_sigterm(admission: Admission, delay: float) -> None:
    """On SIGTERM, fail readiness and refuse new work at once; after `delay`, hand the signal to the server,
    which stops listening and lets in-flight requests finish (uvicorn's graceful-shutdown timeout)."""
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return  # not under a server that handles SIGTERM (e.g. an in-process test client)
    loop = asyncio.get_running_loop()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if not admission.draining:
            log.warning("SIGTERM: draining (readiness fails, new work refused) before shutdown")
        admission.draining = True
        loop.call_soon_threadsafe(loop.call_later, delay, previous, signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def _openapi_with_raw_routes(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents its own routes; the raw-ASGI generation routes are added from their models."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    raw_routes = (
        ("/v1/chat/completions", ChatCompletionRequest),
        ("/v1/completions", CompletionRequest),
        ("/v1/responses", ResponsesRequest),
        ("/v1/messages", MessagesRequest),
        ("/v1/messages/count_tokens", CountTokensRequest),
    )
    for path, model in raw_routes:
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(model_schema.pop("$defs", {}))
        components[model.__name__] = model_schema
        schema["paths"][path] = {
            "post": {
                "summary": f"OpenAI-compatible {path.rsplit('/', 1)[-1].replace('_', ' ')} (relayed to vLLM)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
                },
                "responses": {
                    "200": {"description": "The model's answer, or an SSE stream when stream is true"},
                    "400": {"description": "OpenAI error"},
                },
            }
        }
    app.openapi_schema = schema
    return schema


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI app; `serve` runs it behind `hot_path` (below), which short-cuts the generation routes."""
    delegation = _delegation(settings)
    keys = KeyChecker(settings, delegation)
    runs_batches = settings.batch.enabled and settings.role in ("all", "retrieval")
    # Made by the lifespan, passed to the routes built below.
    generation: Provided[Generation] = Provided("the generation path")
    response_ids: Provided[ResponseIds] = Provided("the response id minter")
    embeddings: Provided[EmbeddingsService] = Provided("the embeddings service")
    batches: Provided[BatchService] = Provided("the batch service")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = GatewayMetrics()
        tracing = Tracing.from_env()
        session = create_session(settings)
        pools = Pools(settings, metrics)
        media = MediaPreparer(settings.media, metrics, tracing)
        upstream = UpstreamClient(session, settings, metrics, tracing)
        serves_retrieval = settings.role in ("all", "retrieval")
        embedder = EmbeddingsService(settings.embeddings, media, metrics, enabled=serves_retrieval, tracing=tracing)
        searcher = SearchService(settings.search, embedder, metrics, tracing)
        limit = settings.memory_limit_bytes or memory_limit_bytes()
        admission = Admission(
            int(limit * settings.memory_shed_fraction) if limit else None, relieve=media.release_memory
        )
        limiter = _key_limiter(settings, keys, metrics)
        ids = _response_ids(settings)
        retriever = _retriever(settings, searcher, upstream)
        generation.set(Generation(settings, metrics, pools, upstream, media, limiter, tracing, retriever))
        batch_service = _batch_service(settings, upstream, delegation, metrics, pools) if runs_batches else None
        if batch_service is not None:
            batches.set(batch_service)
        response_ids.set(ids)
        embeddings.set(embedder)
        app.state.gateway = GatewayState(
            settings,
            metrics,
            pools,
            upstream,
            media,
            embedder,
            searcher,
            admission,
            limiter,
            ids,
            tracing,
        )
        _drain_on_sigterm(admission, settings.drain_delay)
        metrics_server = MetricsServer(
            metrics, settings.host, settings.metrics_port, lambda: health.readiness(app.state.gateway)
        )
        if not settings.auth_enabled:
            log.warning("no API keys configured: /v1/* is open to anyone who can reach this port")
        await pools.start()
        embedder.start()
        media.start()
        if serves_retrieval:
            await searcher.start()
        await metrics_server.start()
        admission.start()
        if batch_service is not None:
            await batch_service.start()
        key_watch = (
            asyncio.create_task(_watch_keys_file(keys, limiter), name="keys-file") if settings.keys_file else None
        )
        try:
            yield
        finally:
            if batch_service is not None:
                await batch_service.stop()
            await metrics_server.stop()
            if key_watch is not None:
                key_watch.cancel()
            await admission.stop()
            await pools.stop()
            await searcher.stop()
            await embedder.close()
            await limiter.close()
            await media.close()
            await session.close()
            tracing.shutdown()

    # /docs (Swagger UI) loads its script and styles from a CDN, outside the pages' Content-Security-Policy: off
    # unless asked for. /openapi.json is always served.
    docs_url = "/docs" if settings.api_docs else None
    app = FastAPI(title="vlm-gateway", version="0.1.0", lifespan=lifespan, redoc_url=None, docs_url=docs_url)
    app.router.routes.extend(chat_router.routes(generation))
    app.router.routes.extend(responses_router.routes(generation, response_ids))
    app.router.routes.extend(messages_router.routes(generation))
    app.include_router(adapters_router.router)
    app.include_router(models.router)
    if settings.role == "proxy":
        app.router.routes.extend(retrieval_proxy.routes)
    else:
        app.include_router(embeddings_router.router(embeddings))
        app.include_router(search_router.router)
    if runs_batches:
        app.include_router(batch_router.router(batches))
    app.include_router(health.router)
    app.include_router(ui.router)
    if settings.metrics_port is None:
        app.add_route("/metrics", health.metrics_endpoint, methods=["GET"], include_in_schema=False)
    app.add_exception_handler(GatewayError, _on_gateway_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_middleware(
        GatewayMiddleware,
        max_body_bytes=settings.max_body_bytes,
        keys=keys,
        log_requests=settings.access_log,
        upload_bytes=settings.batch.max_file_bytes + MULTIPART_OVERHEAD,
    )
    app.openapi = lambda: _openapi_with_raw_routes(app)  # type: ignore[method-assign]
    app.state.keys = keys
    return app


def hot_path(app: FastAPI, settings: Settings) -> HotPathDispatch:
    endpoints: dict[str, tuple[ASGIApp, ErrorRenderer]] = {
        route.path: (route.endpoint, route.endpoint.dialect.error_body)
        for route in app.router.routes
        if isinstance(route, Route) and isinstance(route.endpoint, CompletionsEndpoint)
    }
    return HotPathDispatch(
        app, endpoints, max_body_bytes=settings.max_body_bytes, keys=app.state.keys, log_requests=settings.access_log
    )
