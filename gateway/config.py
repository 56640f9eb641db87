"""The gateway's one Settings object.

Precedence, highest first: explicit overrides (the CLI's flags), `GATEWAY_*` environment variables, the YAML file
given with `--config`, then the defaults below. Outside Settings only the standard `OTEL_*` variables are read
(gateway/tracing.py), and the command-line clients' defaults (`OPENAI_API_KEY`, the Milvus token for `index`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, StringConstraints, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from gateway.qwen import QWEN_PLACEHOLDER_IDS, QWEN_RESERVED_TOKENS, added_vocabulary
from gateway.retrieval_settings import EmbeddingsSettings, SearchSettings

Modality = Literal["image", "video"]


class Timeouts(BaseModel):
    """Separate budgets, because a stalled first token and a stalled stream are different faults."""

    connect: float = Field(5.0, gt=0, le=600)
    first_token: float = Field(120.0, gt=0, le=3600)  # headers + first chunk; long for large visual prompts
    idle: float = Field(60.0, gt=0, le=3600)  # longest silence between two chunks of a stream
    total: float = Field(900.0, gt=0, le=86400)


class MediaSettings(BaseModel):
    """How the gateway fetches and checks media before any replica sees it."""

    allow_data_urls: bool = True
    allow_remote_urls: bool = True
    allowed_domains: list[str] = Field(default_factory=list, max_length=1024)  # empty: any public host
    denied_domains: list[str] = Field(default_factory=list, max_length=1024)
    # Hosts (names or CIDRs) exempt from the private-address check, e.g. an internal image store.
    trusted_hosts: list[str] = Field(default_factory=list, max_length=1024)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_video_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_request_bytes: int = Field(128 * 1024 * 1024, ge=1024)  # all media of one request together
    max_decode_pixels: int = Field(64_000_000, ge=1)  # checked from the header, before decoding
    image_formats: list[str] = Field(default_factory=lambda: ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
    max_redirects: int = Field(3, ge=0, le=10)
    connect_timeout: float = Field(5.0, gt=0, le=120)
    read_timeout: float = Field(10.0, gt=0, le=600)
    total_timeout: float = Field(30.0, gt=0, le=3600)
    max_concurrent_fetches: int = Field(64, ge=1, le=100_000)
    # Remote image URLs in one /v1/embeddings or item upsert request (chat counts against limit_mm_per_prompt).
    max_remote_images_per_request: int = Field(16, ge=0, le=100_000)
    decode_threads: int = Field(2, ge=1, le=256)
    cache_entries: int = Field(256, ge=0, le=1_000_000)
    # Prepared media kept for reuse, in bytes of data URLs; only media of requests that passed their checks.
    cache_bytes: int = Field(256 * 1024 * 1024, ge=0)
    cache_ttl: float = Field(300.0, ge=0)
    video_max_seconds: float = Field(300.0, gt=0)
    video_max_fps: float = Field(60.0, gt=0)
    video_max_frames: int = Field(18_000, ge=1)
    video_max_frame_pixels: int = Field(1920 * 1088, ge=1)


def _default_media_limits() -> dict[Modality, int]:
    return {"image": 4, "video": 1}


# One grammar for every model-like name a client or an admin key can set: it starts with a letter or digit (so
# never `.`, `..` or `-`), has no control character, space or slash (it would read as a path segment).
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,255}$"


class LoraModule(BaseModel):
    """An adapter served beside the pool's base model, as vLLM's `--lora-modules` spells it."""

    model_config = {"extra": "forbid"}

    name: str = Field(min_length=1, max_length=256, pattern=ADAPTER_NAME_PATTERN)
    path: str = Field(min_length=1, max_length=4096)


class PoolScheduling(BaseModel):
    """The pool's scheduler (gateway/scheduling/): per-replica in-flight limits adapted to each engine's own
    queue, and the order in which work waiting at the gateway goes on (band, then tenant fairness)."""

    # false: no limits and no queue at the gateway; vLLM's first-come-first-served queue decides who waits.
    enabled: bool = True
    initial_limit: int = Field(4, ge=1, le=100_000)  # a replica new to the gateway starts here, then grows
    min_limit: int = Field(1, ge=1, le=100_000)
    max_limit: int = Field(1024, ge=1, le=100_000)  # the operator's cap per replica
    max_queue_bytes: int = Field(256 * 1024 * 1024, ge=1024, le=64 * 1024**3)  # bodies held by waiting requests
    flex_queue_timeout: float = Field(600.0, gt=0, le=86400)  # flex waits for idle capacity: longer than default
    # Slots per replica that flex work leaves free, so an interactive request arriving during a bulk job starts
    # at once rather than after a bulk request ends (nothing is preempted on a replica).
    flex_reserve: int = Field(1, ge=0, le=100_000)
    # Seconds without an interactive request after which flex work may take the reserve too (a batch alone then
    # fills the pool); the first interactive request after the lull may wait for one flex request to finish.
    flex_reserve_idle: float = Field(30.0, gt=0, le=365 * 86400)
    probe_interval: float = Field(0.5, gt=0, le=60)  # how often a binding replica's engine queue is read
    # Requests each engine may hold waiting beyond its batch: one replaces a finished sequence without a round
    # trip to the gateway, but a newcomer then waits behind it in the engine's own queue (measured: light TTFT
    # p50 under a flood 216 ms with 1, 101 ms with 0, total tokens/s no better).
    engine_queue: int = Field(0, ge=0, le=1024)
    # With rate_limits_redis_url set, tenant counters are shared through it by every gateway serving this pool.
    share_counters: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> PoolScheduling:
        if not self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError("scheduling needs min_limit <= initial_limit <= max_limit")
        return self


class ModelPool(BaseModel):
    """One served model name and the vLLM replicas that serve it."""

    name: str = Field(min_length=1, max_length=256)
    upstreams: list[str] = Field(default_factory=list, max_length=64)
    # A name with one DNS address per replica (a headless Service), re-resolved every health-check interval:
    # each address becomes a replica. Zero addresses is a pool scaled to zero, answered 503 + Retry-After.
    discover: str | None = Field(None, max_length=512)
    # Mirrors `vllm serve --limit-mm-per-prompt`; checked before any media is fetched.
    limit_mm_per_prompt: dict[Modality, int] = Field(default_factory=lambda: _default_media_limits())
    max_model_len: int | None = Field(None, ge=16, le=10_000_000)
    quantization: Literal["bf16", "fp16", "fp8", "awq", "gptq", "none"] | None = None
    # Admission: at most max_inflight requests on this pool (beside each replica's adaptive limit); max_queue
    # more wait at the gateway, priority and default ones up to queue_timeout seconds (flex: scheduling's own).
    max_inflight: int | None = Field(None, ge=1)
    max_queue: int = Field(1024, ge=0, le=1_000_000)
    queue_timeout: float = Field(10.0, gt=0, le=3600)
    scheduling: PoolScheduling = Field(default_factory=PoolScheduling)
    # Engine-steering request fields (chat_template, mm_processor_kwargs, ...) the operator lets through.
    allow_fields: list[str] = Field(default_factory=list, max_length=64)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    # Image pixel budget, as Qwen2.5-VL's processor spells it; images are resized into it at the gateway.
    # The defaults are the processor's own, so answers match a direct call; lower max_pixels to save tokens.
    min_pixels: int = Field(4 * 28 * 28, ge=28 * 28)
    max_pixels: int = Field(16384 * 28 * 28, ge=28 * 28)
    # Refused in any text a client sends, and as ids in token prompts (the defaults are Qwen2.5-VL's).
    reserved_tokens: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        default_factory=lambda: list(QWEN_RESERVED_TOKENS), max_length=1024
    )
    reserved_token_ids: list[int] = Field(default_factory=lambda: list(QWEN_PLACEHOLDER_IDS), max_length=1024)
    # The served checkpoint's tokenizer (its directory or tokenizer.json, as the gateway sees it): every added
    # token joins reserved_tokens, and the media placeholders' ids join reserved_token_ids.
    tokenizer: str | None = Field(None, min_length=1, max_length=4096)
    # Routing (gateway/upstream/routing.py): "affinity" sends each conversation to the replica whose caches hold
    # it, within (1 + affinity_epsilon) x the mean load; "least_outstanding" ignores caches.
    routing: Literal["affinity", "least_outstanding"] = "affinity"
    affinity_epsilon: float = Field(0.25, ge=0, le=100)
    # A client header naming the conversation (used before the computed key; prompt_cache_key comes first).
    session_header: str = Field("x-session-id", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")
    # Whether OpenAI's prompt_cache_key goes on to vLLM too (it is always used for routing).
    forward_prompt_cache_key: bool = False
    # A prompt longer than max_model_len * this many characters cannot fit; rejected without tokenising.
    max_chars_per_token: float = Field(10.0, gt=0, le=1000)
    # LoRA adapters the replicas serve by name (`vllm serve --enable-lora --lora-modules`). A request naming one
    # goes only to replicas whose /v1/models lists it; `/v1/models` lists each with `parent` = this pool.
    lora_modules: list[LoraModule] = Field(default_factory=list, max_length=256)
    # Directories `POST /v1/adapters` may load adapters from (paths as the replicas see them); none: no loading.
    adapter_roots: list[str] = Field(default_factory=list, max_length=16)
    # Adapters loaded at runtime per pool (each adds metric series and replica memory).
    max_loaded_adapters: int = Field(16, ge=0, le=1024)

    @field_validator("upstreams")
    @classmethod
    def _strip_slash(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"upstream must be an http(s) base URL, got {url!r}")
        return [u.rstrip("/") for u in urls]

    @field_validator("session_header")
    @classmethod
    def _lower_header(cls, name: str) -> str:
        return name.lower()  # as ASGI servers hand headers over

    @field_validator("discover")
    @classmethod
    def _discover_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            # https to a bare pod address would fail certificate checks; in-cluster vLLM speaks http.
            raise ValueError(f"discover must be an http:// URL with a host name, got {url!r}")
        return url.rstrip("/")

    @model_validator(mode="after")
    def _some_replicas(self) -> ModelPool:
        if not self.upstreams and self.discover is None:
            raise ValueError(f"model pool '{self.name}' needs upstreams, discover, or both")
        return self

    @model_validator(mode="after")
    def _tokenizers_own_tokens(self) -> ModelPool:
        if self.tokenizer is not None:
            tokens, ids = added_vocabulary(self.tokenizer)
            self.reserved_tokens = list(dict.fromkeys([*self.reserved_tokens, *tokens]))
            self.reserved_token_ids = list(dict.fromkeys([*self.reserved_token_ids, *ids]))
        return self

    @field_validator("limit_mm_per_prompt")
    @classmethod
    def _non_negative(cls, limits: dict[Modality, int]) -> dict[Modality, int]:
        if any(v < 0 for v in limits.values()):
            raise ValueError("limit_mm_per_prompt counts must be >= 0")
        return limits


Scope = Literal["read", "write", "admin", "operator"]
ServiceTier = Literal["priority", "default", "flex"]
ALL_SCOPES: tuple[Scope, ...] = ("read", "write", "admin", "operator")
LEAST_SCOPES: tuple[Scope, ...] = ("read",)  # what a scoped key gets when its entry names none


class RateLimits(BaseModel):
    """Per-key budgets; None is unlimited. Tokens count prompt text (chars/4), visual tokens and max_tokens."""

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    concurrency: int | None = Field(None, ge=1)


class ScopedKey(BaseModel):
    """An API key with limited rights (gateway/access/scopes.py): `read` by default; `write` (index items),
    `admin` (collections of its own namespace), `operator` (any namespace's collections) when given.
    `namespace` groups keys that share items; by default each key is its own."""

    key: SecretStr | None = None  # hashed at load; or give the digest:
    sha256: str | None = None
    scopes: list[Scope] = Field(default_factory=lambda: list(LEAST_SCOPES), max_length=len(ALL_SCOPES))
    namespace: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    rate_limits: RateLimits | None = None  # default: the gateway-wide `rate_limits`
    # Fair share of a full pool (gateway/scheduling/): the band a request runs in when it names no service_tier,
    # the highest it may name (above it: 403), and the weight of the key's tenant (its namespace, else the key)
    # among the tenants waiting in one band. Keys of one namespace share one tenant: give them one weight.
    service_tier: ServiceTier = "default"
    max_service_tier: ServiceTier = "default"
    weight: float = Field(1.0, ge=0.01, le=100)

    @model_validator(mode="after")
    def _tier_within_ceiling(self) -> ScopedKey:
        order = ("priority", "default", "flex")
        if order.index(self.service_tier) < order.index(self.max_service_tier):
            raise ValueError("a key's service_tier cannot be above its max_service_tier")
        return self

    @model_validator(mode="after")
    def _one_digest(self) -> ScopedKey:
        if self.key is not None:
            self.sha256 = hash_api_key(self.key.get_secret_value())
            self.key = None
        if self.sha256 is None or len(self.sha256) != 64:
            raise ValueError("a scoped key needs `key` or a 64-hex-digit `sha256`")
        self.sha256 = self.sha256.lower()
        return self


def hash_api_key(key: str) -> str:
    """Keys are kept as SHA-256 digests only; a leaked config or heap dump reveals no usable key."""
    return hashlib.sha256(key.encode()).hexdigest()


class ResponsesSettings(BaseModel):
    # Signs the response ids the gateway mints (gateway/responses/ids.py). Every gateway replica behind one
    # Service needs the same secret to route another's ids; unset, each process draws its own at start.
    id_secret: SecretStr | None = None  # SecretStr: never printed in a dump or a log
    # Ids older than this are answered 404 (vLLM's store keeps responses until the replica restarts).
    ttl: float = Field(86400.0, gt=0, le=365 * 86400)


class BatchSettings(BaseModel):
    """/v1/files and /v1/batches (gateway/batch/): stored input files and bulk jobs whose lines run as the creating
    key's requests in the scheduler's flex band. Runs where state is kept: role `all`, or the retrieval tier."""

    enabled: bool = True
    # Files, job state (SQLite) and results live here; in the chart, on the state tier's volume.
    dir: Path = Field(default_factory=lambda: Path.home() / ".local" / "share" / "vlm-gateway" / "batch")
    # Where lines are sent: a proxy tier's Service in the chart (its scheduler then orders them with everyone
    # else's work). None: this gateway's own listener.
    dispatch_url: str | None = Field(None, pattern=r"^https?://")
    # Signs the credentials lines are sent with (gateway/access/delegation.py): the same value on every gateway
    # that sends or receives lines. Unset, each process draws its own (enough for role `all`).
    secret: SecretStr | None = None
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1024, le=64 * 1024**3)  # OpenAI's limit per file
    max_lines: int = Field(50_000, ge=1, le=10_000_000)  # OpenAI's limit per batch
    max_stored_bytes_per_key: int = Field(10 * 1024**3, ge=1024)  # input and output files a key holds
    max_open_batches_per_key: int = Field(16, ge=1, le=100_000)
    # Lines of one batch in flight at once; they wait in the flex band, so more only queues more at the gateway.
    concurrency: int = Field(16, ge=1, le=4096)
    max_attempts: int = Field(3, ge=1, le=100)  # for a line whose replica failed (502/504); 429/503 wait instead


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_nested_delimiter="__", extra="forbid")

    role: Literal["all", "proxy", "retrieval"] = "all"
    # role "proxy": where /v1/embeddings, /v1/search and /v1/collections go (the retrieval Service, one writer).
    retrieval_url: str | None = Field(None, pattern=r"^https?://")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # The operator's port: /metrics, /health/live and /health/ready apart from client traffic (probes cannot be
    # starved by a full listener). None: /metrics on the main port.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # One line per /v1 request (method, route, status, duration, request id, trace id, key id): off by default,
    # as it costs more than the rest of the proxy path. "json" writes every log line as one JSON object.
    access_log: bool = False
    log_format: Literal["text", "json"] = "text"
    api_docs: bool = False  # /docs, FastAPI's Swagger UI: it loads assets from a CDN, so it is off by default

    models: list[ModelPool] = Field(default_factory=list, max_length=256)
    media: MediaSettings = Field(default_factory=MediaSettings)
    embeddings: EmbeddingsSettings = Field(default_factory=EmbeddingsSettings)
    search: SearchSettings = Field(default_factory=SearchSettings)
    responses: ResponsesSettings = Field(default_factory=ResponsesSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)

    # Plaintext keys (from --api-key or GATEWAY_API_KEYS) are hashed at load; only digests are kept.
    api_keys: list[SecretStr] = Field(default_factory=list, exclude=True)
    api_key_hashes: list[str] = Field(default_factory=list)
    keys: list[ScopedKey] = Field(default_factory=list, max_length=100_000)
    # A YAML list of keys (as `keys`), re-read when it changes: add, rotate or revoke keys without a restart.
    # Naming a file turns auth on even while the file is empty (then nobody gets in).
    keys_file: Path | None = None

    rate_limits: RateLimits = Field(default_factory=RateLimits)
    # Shared budgets across gateway replicas (redis:// or rediss://); unset: each replica keeps its own.
    rate_limits_redis_url: str | None = Field(None, pattern=r"^rediss?://")
    # Shed new work with 503 once resident memory reaches this fraction of the cgroup limit (or of
    # memory_limit_bytes when set); the process never reaches the OOM killer through admitted work.
    memory_shed_fraction: float = Field(0.9, gt=0, le=1)
    memory_limit_bytes: int | None = Field(None, ge=1)
    # SIGTERM: readiness fails and new work is refused at once; in-flight work gets drain_timeout to finish.
    drain_delay: float = Field(0.0, ge=0, le=600)  # keep serving in-flight while endpoints update
    drain_timeout: float = Field(30.0, ge=0, le=3600)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    # The listener's own limits (gateway/server/connections.py), enforced before any request is parsed: request
    # line + headers in bytes (431 beyond), the time they may take to arrive (408), the longest pause inside a
    # body, idle keep-alive, and open connections (503 beyond; the file-descriptor limit is raised to fit).
    max_head_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    head_timeout: float = Field(10.0, gt=0, le=600)
    body_idle_timeout: float = Field(30.0, gt=0, le=3600)
    # A body must arrive at least this fast over every 5 s window (or finish what it owes within one): a body
    # trickled a byte at a time cannot hold a connection slot.
    min_body_rate: int = Field(4096, ge=1, le=1024 * 1024 * 1024)
    keepalive_timeout: float = Field(5.0, gt=0, le=3600)
    max_connections: int = Field(4096, ge=1, le=1_000_000)
    # Bodies above this size are parsed and validated in a worker thread, off the event loop.
    inline_parse_bytes: int = Field(256 * 1024, ge=0)
    # Calls to other services, each its own budget: one forwarded to the retrieval service (role proxy: search,
    # embeddings, and file uploads up to batch.max_file_bytes), a grounded chat's search there, and an adapter
    # load or unload on each replica (vLLM reads the weights from its volume).
    retrieval_timeout: float = Field(300.0, gt=0, le=86400)
    grounding_timeout: float = Field(30.0, gt=0, le=3600)
    adapter_call_timeout: float = Field(120.0, gt=0, le=3600)
    health_check_interval: float = Field(5.0, gt=0, le=3600)
    health_check_timeout: float = Field(2.0, gt=0, le=60)
    # How long a replica that refused a connection or answered 429/503 is skipped.
    replica_cooldown: float = Field(5.0, ge=0, le=3600)
    # Circuit breaker: this many consecutive failures (5xx, first-token timeouts) open it for breaker_cooldown
    # seconds; then one probe request decides whether it closes again.
    breaker_failures: int = Field(5, ge=1, le=10_000)
    breaker_cooldown: float = Field(10.0, ge=0, le=3600)
    # Retries (failover before the first byte) stay below this fraction of requests, plus a small burst.
    retry_budget_ratio: float = Field(0.2, ge=0, le=1)
    retry_budget_burst: int = Field(10, ge=0, le=100_000)
    upstream_max_connections: int = Field(2048, ge=1, le=1_000_000)

    @field_validator("api_key_hashes")
    @classmethod
    def _hex_digests(cls, digests: list[str]) -> list[str]:
        for digest in digests:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise ValueError("api_key_hashes entries must be SHA-256 hex digests")
        return [d.lower() for d in digests]

    @model_validator(mode="after")
    def _fold_plain_keys(self) -> Settings:
        digests = [hash_api_key(k.get_secret_value()) for k in self.api_keys]
        self.api_key_hashes = sorted(set(self.api_key_hashes) | set(digests))
        self.api_keys = []
        if self.role == "proxy" and not self.retrieval_url:
            raise ValueError("role 'proxy' needs retrieval_url (the retrieval service's base URL)")
        names = [pool.name for pool in self.models]
        names += [adapter.name for pool in self.models for adapter in pool.lora_modules]
        if len(names) != len(set(names)):
            raise ValueError("model pool and adapter names must be unique")
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_key_hashes or self.keys or self.keys_file)

    def pool(self, name: str) -> ModelPool | None:
        return next((p for p in self.models if p.name == name), None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = settings_cls.model_config.get("yaml_file")
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from overrides > env > YAML file > defaults."""
    if config_file is None:
        return Settings(**overrides)
    if not config_file.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(yaml_file=config_file)

    loaded = _FileSettings(**overrides)
    return Settings.model_validate(loaded.model_dump())
