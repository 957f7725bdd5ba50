"""The OpenAI wire format (the subset loraforge serves), as pydantic models.

Unknown request fields are accepted and ignored, and the server logs which ones it ignored
(as vLLM does), so clients that send extra options keep working.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(examples=["base"], description="The base model ('base' or its name) or an adapter's name")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str
    max_tokens: int | None = Field(default=16, ge=1)


class GenerateRequest(BaseModel):
    """The simple form: POST /generate."""

    model_config = ConfigDict(extra="allow")

    prompt: str
    max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    adapter: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str, code: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
