"""Anthropic's Messages API as a dialect of the one generation path (gateway/chat/serving.py): the same checks,
media guard, budgets, fair share, affinity, metrics and failover, forwarded to vLLM's own `/v1/messages`.

What the dialect says: image blocks sit in `messages[i].content[j]` with a base64 or URL source; both go through
the media guard (a URL is fetched once by the gateway) and are sent on as base64 blocks of the prepared JPEG. A
conversation keys its replica exactly as it would in the OpenAI dialects — the system prompt, then the turns up to
the first user turn, each image by the content hash of what vLLM receives — so an image sent as a base64 block and
the same image as an OpenAI data URL land on the same replica. Errors and a broken stream's last event are
Anthropic's (gateway/messages/errors.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.chat.checks import ChatMedia
from gateway.chat.serving import Placement
from gateway.errors import GatewayError
from gateway.media.images import PreparedMedia
from gateway.media.service import MediaPart
from gateway.messages.errors import anthropic_error_body, anthropic_stream_error
from gateway.messages.protocol import Base64Source, CountTokensRequest, MessagesRequest
from gateway.upstream.pool import ReplicaSet
from gateway.upstream.routing import affinity_key

Request = MessagesRequest | CountTokensRequest


@dataclass(frozen=True, slots=True)
class MessagesDialect:
    model_cls: type[MessagesRequest] | type[CountTokensRequest]

    def stream_error(self, error: GatewayError, tail: bytes) -> bytes:
        return anthropic_stream_error(error, tail)

    def error_body(self, error: GatewayError) -> bytes:
        return anthropic_error_body(error)

    def media(self, request: Request) -> list[ChatMedia]:
        found = []
        for message, index, block in request.image_blocks():
            source = block.source
            url = f"data:{source.media_type};base64,{source.data}" if isinstance(source, Base64Source) else source.url
            found.append(ChatMedia(message, index, MediaPart("image", url, f"messages[{message}].content[{index}]")))
        return found

    def replace_media(self, data: dict[str, Any], media: list[ChatMedia], prepared: list[PreparedMedia]) -> None:
        for where, item in zip(media, prepared, strict=True):
            media_type, _, encoded = item.data_url.removeprefix("data:").partition(";base64,")
            source = {"type": "base64", "media_type": media_type, "data": encoded}
            data["messages"][where.message]["content"][where.index] = {"type": "image", "source": source}

    def routing_key(
        self,
        request: Request,
        namespace: str,
        session: str | None,
        media: list[ChatMedia],
        prepared: list[PreparedMedia],
    ) -> bytes:
        leading = next((i for i, m in enumerate(request.messages) if m.role == "user"), len(request.messages) - 1)
        hashes = [item.sha256 for where, item in zip(media, prepared, strict=True) if where.message <= leading]
        system = request.system_texts()
        texts = [*(("system", *system) if system else ())]
        for message in request.messages[: leading + 1]:
            texts += [message.role, *message.texts()]
        return affinity_key(namespace, session, texts, hashes)

    def placement(self, replicas: ReplicaSet, request: Request, namespace: str) -> Placement:
        return Placement()
