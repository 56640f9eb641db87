from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from gateway.cli import _overrides, build_parser, main, missing_extra
from gateway.config import hash_api_key, load_settings


def _yaml(tmp_path: Path, data: dict[str, object]) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_precedence_is_overrides_then_env_then_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _yaml(tmp_path, {"port": 1111, "metrics_port": 2222, "log_level": "debug"})
    monkeypatch.setenv("GATEWAY_PORT", "3333")
    monkeypatch.setenv("GATEWAY_METRICS_PORT", "4444")
    settings = load_settings(path, metrics_port=5555)
    assert (settings.port, settings.metrics_port, settings.log_level) == (3333, 5555, "debug")


def test_models_from_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_MODELS", '[{"name": "qwen", "upstreams": ["http://a:8000/", "http://b:8000"]}]')
    pool = load_settings().pool("qwen")
    assert pool is not None
    assert pool.upstreams == ["http://a:8000", "http://b:8000"]
    assert pool.limit_mm_per_prompt == {"image": 4, "video": 1}


def test_plain_keys_are_kept_only_as_digests() -> None:
    settings = load_settings(api_keys=["sk-one"], api_key_hashes=[hash_api_key("sk-two")])
    assert settings.api_key_hashes == sorted([hash_api_key("sk-one"), hash_api_key("sk-two")])
    assert "sk-one" not in settings.model_dump_json()
    assert "sk-one" not in repr(settings)


@pytest.mark.parametrize(
    "bad",
    [
        {"models": [{"name": "m", "upstreams": ["ftp://x"]}]},
        {"models": [{"name": "m", "upstreams": []}]},
        {"models": [{"name": "m", "upstreams": ["http://x"], "limit_mm_per_prompt": {"image": -1}}]},
        {"models": [{"name": "m", "upstreams": ["http://x"]}, {"name": "m", "upstreams": ["http://y"]}]},
        {"api_key_hashes": ["not-a-digest"]},
        {"no_such_setting": 1},
    ],
)
def test_invalid_configuration_is_refused(tmp_path: Path, bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        load_settings(_yaml(tmp_path, bad))


def test_cli_flags_build_one_pool() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--port",
            "8080",
            "--api-key",
            "k1",
            "--api-key",
            "k2",
            "--upstream",
            "http://127.0.0.1:8000",
            "--upstream",
            "http://127.0.0.1:8001",
            "--model",
            "qwen",
            "--limit-mm-per-prompt",
            '{"image":2,"video":1}',
            "--max-model-len",
            "4096",
            "--clip-model",
            "tiny-random",
        ]
    )
    settings = load_settings(**_overrides(args))
    pool = settings.pool("qwen")
    assert pool is not None and len(pool.upstreams) == 2
    assert pool.limit_mm_per_prompt == {"image": 2, "video": 1}
    assert pool.max_model_len == 4096 and len(settings.api_key_hashes) == 2
    assert settings.embeddings.clip_model == "tiny-random"


def test_missing_config_file_exits_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--config", str(tmp_path / "absent.yaml")])
    assert exited.value.code == 2
    assert "config file not found" in capsys.readouterr().err


def test_redis_url_for_shared_limits_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart passes it as GATEWAY_RATE_LIMITS_REDIS_URL from a Secret, never through the config file."""
    monkeypatch.setenv("GATEWAY_RATE_LIMITS_REDIS_URL", "redis://:pw@redis:6379/0")
    assert load_settings(None).rate_limits_redis_url == "redis://:pw@redis:6379/0"
    monkeypatch.setenv("GATEWAY_RATE_LIMITS_REDIS_URL", "http://not-redis")
    with pytest.raises(ValidationError):
        load_settings(None)


def test_a_missing_optional_extra_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    milvus = load_settings(search={"backend": "milvus", "milvus_uri": "/tmp/m.db"})
    assert missing_extra(milvus) is None, "this environment has the extra"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "pymilvus" else real(name))
    assert missing_extra(milvus) == "search.backend milvus needs the milvus extra: pip install 'vlm-gateway[milvus]'"
    assert missing_extra(load_settings()) is None, "FAISS needs nothing more"
    proxy = load_settings(role="proxy", retrieval_url="http://r:8080", search={"backend": "milvus", "milvus_uri": "x"})
    assert missing_extra(proxy) is None, "a proxy runs no engine"


def _tokenizer(folder: Path, added: list[dict[str, object]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": added}))
    return folder


def test_a_pools_tokenizer_completes_its_reserved_tokens_and_placeholder_ids(tmp_path: Path) -> None:
    """Hardening round 3, class 5: a checkpoint's added tokens join the defaults (special or not, as Qwen2.5's
    tool-call markers are not), its media placeholders' ids replace nothing and add their own; an added token that
    is only whitespace is a spelling and stays allowed."""
    added = [
        {"id": 0, "content": "<|endoftext|>", "special": True},
        {"id": 7, "content": "<|image_pad|>", "special": True},
        {"id": 8, "content": "<|vision_start|>", "special": True},
        {"id": 9, "content": "<|think|>", "special": False},
        {"id": 10, "content": "    ", "special": False},
    ]
    folder = _tokenizer(tmp_path / "ckpt", added)
    pool = {"name": "m", "upstreams": ["http://x"], "tokenizer": str(folder)}
    settings = load_settings(_yaml(tmp_path, {"models": [pool]}))
    reserved = settings.models[0].reserved_tokens
    assert "<|think|>" in reserved and "<|fim_prefix|>" in reserved and "    " not in reserved
    assert reserved.count("<|image_pad|>") == 1
    assert {7, 8} <= set(settings.models[0].reserved_token_ids) and 151655 in settings.models[0].reserved_token_ids
    just_the_file = {**pool, "tokenizer": str(folder / "tokenizer.json")}
    assert load_settings(_yaml(tmp_path, {"models": [just_the_file]})).models[0].reserved_tokens == reserved


@pytest.mark.parametrize(
    ("contents", "says"),
    [
        (None, "cannot read"),
        ("{not json", "cannot read"),
        (json.dumps({"added_tokens": [{"content": "<x>"}]}), "cannot read"),
        (json.dumps({"added_tokens": [{"id": 1, "content": "<" + "x" * 80 + ">"}]}), "longer than 64"),
        (json.dumps({"added_tokens": [{"id": i, "content": f"<{i}>"} for i in range(1025)]}), "more than 1024"),
    ],
)
def test_a_tokenizer_that_cannot_be_read_is_a_configuration_error(
    tmp_path: Path, contents: str | None, says: str
) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    if contents is not None:
        (folder / "tokenizer.json").write_text(contents)
    pool = {"name": "m", "upstreams": ["http://x"], "tokenizer": str(folder)}
    with pytest.raises(ValidationError) as refused:
        load_settings(_yaml(tmp_path, {"models": [pool]}))
    assert says in str(refused.value)
