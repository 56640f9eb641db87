"""`gateway serve ...`, `gateway index ...` and `gateway batch ...`: the command line turns flags into Settings
overrides, or runs a client of a running gateway."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from gateway.config import Settings, load_settings


def _serve_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, help="YAML config file (every key also as a GATEWAY_* variable)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--metrics-port", type=int, help="serve /metrics on this port instead of the main one")
    serve.add_argument("--upstream", action="append", help="vLLM base URL; repeat for replicas of --model")
    serve.add_argument(
        "--discover", help="http://NAME:PORT whose DNS addresses are --model's replicas (a headless Service)"
    )
    serve.add_argument("--model", help="served model name of the --upstream / --discover replicas")
    serve.add_argument("--limit-mm-per-prompt", help='as vLLM spells it, e.g. \'{"image":2,"video":1}\'')
    serve.add_argument("--max-model-len", type=int, help="the model's context length, for early rejection")
    serve.add_argument("--max-inflight", type=int, help="requests in flight on the model before 429s")
    serve.add_argument("--api-key", action="append", help="accepted API key; repeatable (stored hashed)")
    serve.add_argument("--keys-file", type=Path, help="YAML list of scoped keys, re-read when it changes")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--role", choices=["all", "proxy", "retrieval"])
    serve.add_argument("--index-dir", type=Path, help="where search collections live")
    serve.add_argument("--clip-model", help='open_clip model name, or "tiny-random" (built in, no download)')
    serve.add_argument("--clip-pretrained", help="open_clip pretrained tag (fetched from the hub)")
    serve.add_argument("--clip-checkpoint", help="local CLIP weights (.safetensors, or torch weights_only)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name in ("host", "port", "metrics_port", "log_level", "role"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    clip = {
        key: value
        for key, value in (
            ("clip_model", args.clip_model),
            ("pretrained", args.clip_pretrained),
            ("checkpoint", args.clip_checkpoint),
        )
        if value is not None
    }
    if clip:
        overrides["embeddings"] = clip
    if args.index_dir is not None:
        overrides["search"] = {"index_dir": args.index_dir}
    if args.api_key:
        overrides["api_keys"] = args.api_key
    if args.keys_file is not None:
        overrides["keys_file"] = args.keys_file
    if args.upstream or args.discover or args.model:
        if not ((args.upstream or args.discover) and args.model):
            raise SystemExit("--model goes with --upstream and/or --discover")
        pool: dict[str, Any] = {"name": args.model, "upstreams": args.upstream or [], "discover": args.discover}
        if args.limit_mm_per_prompt:
            try:
                pool["limit_mm_per_prompt"] = json.loads(args.limit_mm_per_prompt)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"--limit-mm-per-prompt is not JSON: {exc}") from None
        if args.max_model_len:
            pool["max_model_len"] = args.max_model_len
        if args.max_inflight:
            pool["max_inflight"] = args.max_inflight
        overrides["models"] = [pool]
    return overrides


def _index_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    index = commands.add_parser("index", help="search collections: ingest, export, restore")
    actions = index.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="send a folder (or glob) of images to a running gateway; resumable")
    add.add_argument("source", help="folder, or a glob such as 'photos/**/*.jpg'")
    add.add_argument("--collection", required=True)
    add.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    add.add_argument("--api-key", help="a key with the write scope (admin too, to create the collection)")
    add.add_argument("--captions", type=Path, help="file,caption CSV or JSON lines with file/caption")
    add.add_argument("--batch-size", type=int, default=16)
    add.add_argument("--follow-links", action="store_true", help="follow symlinks that lead out of the folder")
    export = actions.add_parser("export", help="archive one collection (FAISS: safe while the gateway runs)")
    _engine_arguments(export)
    export.add_argument("--collection", required=True)
    export.add_argument("--out", type=Path, required=True)
    restore = actions.add_parser("restore", help="unpack an exported collection (FAISS: start the gateway after)")
    _engine_arguments(restore)
    restore.add_argument("archive", type=Path)


def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the collection lives: a FAISS index directory, or Milvus (the token from GATEWAY_SEARCH__MILVUS_TOKEN).
    One archive format serves both, so an export from one engine restores into the other."""
    engine = parser.add_mutually_exclusive_group(required=True)
    engine.add_argument("--index-dir", type=Path, help="a FAISS index directory")
    engine.add_argument("--milvus-uri", help="a Milvus URL, or a Milvus Lite file (with its gateway stopped)")


def _milvus_settings(uri: str) -> Any:
    from gateway.retrieval_settings import SearchSettings

    token = os.environ.get("GATEWAY_SEARCH__MILVUS_TOKEN")
    return SearchSettings(backend="milvus", milvus_uri=uri, milvus_token=token)


def _run_index(args: argparse.Namespace) -> None:
    from gateway.search.archive import export_collection, restore_collection

    if args.action == "add":
        from gateway.clients.ingest import ingest

        result = ingest(
            args.source,
            args.collection,
            args.url,
            args.api_key,
            captions=args.captions,
            batch_size=args.batch_size,
            follow_links=args.follow_links,
        )
        print(
            f"indexed {result.sent} images into '{args.collection}' ({result.skipped} already done, "
            f"{result.not_images} not images, {result.outside} links out of the folder not followed) "
            f"in {result.seconds:.1f}s: {result.rate:.1f} images/s"
        )
    elif args.milvus_uri is not None:
        from gateway.search.milvus_archive import export_from_milvus, restore_into_milvus

        settings = _milvus_settings(args.milvus_uri)
        if args.action == "export":
            size = export_from_milvus(settings, args.collection, args.out)
            print(f"exported '{args.collection}' to {args.out} ({size} bytes)")
        else:
            name, count = restore_into_milvus(settings, args.archive)
            print(f"restored '{name}' ({count} items) into Milvus at {args.milvus_uri}")
    elif args.action == "export":
        size = export_collection(args.index_dir, args.collection, args.out)
        print(f"exported '{args.collection}' to {args.out} ({size} bytes)")
    else:
        args.index_dir.mkdir(parents=True, exist_ok=True)
        print(f"restored '{restore_collection(args.index_dir, args.archive)}' into {args.index_dir}")


def _batch_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    batch = commands.add_parser("batch", help="bulk jobs through the Batch API of a running gateway")
    actions = batch.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", help="upload a JSONL file of requests and start a batch")
    submit.add_argument("file", type=Path, help="JSONL: one {custom_id, method, url, body} per line")
    submit.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    submit.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    submit.add_argument("--endpoint", default="/v1/chat/completions", help="the lines' url")
    submit.add_argument("--completion-window", default="24h", help="24h, or shorter: 30m, 90s")
    submit.add_argument("--wait", action="store_true", help="show progress, then download the output")


def _run_batch(args: argparse.Namespace) -> None:
    from gateway.clients.batch_submit import submit

    done = submit(
        args.file, args.url, args.api_key, endpoint=args.endpoint, window=args.completion_window, wait=args.wait
    )
    batch = done.batch
    counts = batch["request_counts"]
    print(f"{batch['id']}: {batch['status']} ({counts['completed']} completed, {counts['failed']} failed)")
    for label, path in (("output", done.output), ("errors", done.errors)):
        if path is not None:
            print(f"{label}: {path}")


def missing_extra(settings: Settings) -> str | None:
    """The optional extra this configuration needs and this environment lacks, as one line to act on."""
    from importlib.util import find_spec

    if settings.role == "proxy" or settings.search.backend != "milvus":
        return None
    if find_spec("pymilvus") is None:
        return "search.backend milvus needs the milvus extra: pip install 'vlm-gateway[milvus]'"
    if not settings.search.milvus_uri.startswith(("http://", "https://")) and find_spec("milvus_lite") is None:
        return (
            "a file-path search.milvus_uri starts Milvus Lite, in the milvus extra: pip install 'vlm-gateway[milvus]'"
        )
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible gateway for vLLM + CLIP search")
    commands = parser.add_subparsers(dest="command", required=True)
    _serve_parser(commands)
    _index_parser(commands)
    _batch_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command in ("index", "batch"):
        from gateway.clients.batch_submit import SubmitFailed

        # Each tool's expected failures (bad input, the file system, the gateway's refusals) are one line.
        clients: dict[str, tuple[Callable[[argparse.Namespace], None], tuple[type[Exception], ...]]] = {
            "index": (_run_index, (ValueError, OSError, tarfile.TarError)),
            "batch": (_run_batch, (SubmitFailed, OSError, httpx.HTTPError)),
        }
        run, expected = clients[args.command]
        try:
            run(args)
        except expected as exc:
            print(f"gateway {args.command} {args.action}: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    if args.command == "serve":
        try:
            settings = load_settings(args.config, **_overrides(args))
        except (ValidationError, FileNotFoundError) as exc:
            print(f"gateway: invalid configuration:\n{exc}", file=sys.stderr)
            raise SystemExit(2) from None
        missing = missing_extra(settings)
        if missing is not None:
            print(f"gateway: {missing}", file=sys.stderr)
            raise SystemExit(2)
        if not settings.models:
            print(
                "gateway: no model pools configured (use --upstream or --discover with --model, or a config file)",
                file=sys.stderr,
            )
        from gateway.server.serve import serve

        serve(settings)


if __name__ == "__main__":
    main()
