"""Request bodies of the OpenAI-compatible routes (pydantic) and their translation into manager calls.

Field names and types follow OpenAI's API reference and what llama-cpp-python's server accepts. A field
this engine does not implement is never ignored silently: known OpenAI fields that would change the output
(``logit_bias``, penalties, ``logprobs``, ``n`` > 1, ...) and any unknown field with a value raise
``InvalidRequest`` naming the field (-> HTTP 400).

Function tools (``tools``, ``tool_choice``, ``parallel_tool_calls``, assistant ``tool_calls`` and ``tool``
messages) become an engine ``ToolSet`` (engine/tool_calls.py): the reply is decoded under the tool-call
grammar and comes back as ``tool_calls``.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import TTAEngineError


class InvalidRequest(TTAEngineError, ValueError):
    """A request field has a value this server does not accept (HTTP 400, names the field)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _unset(value: Any) -> bool:
    """Values that mean "not given" for an extra field: None, False, empty containers."""
    return value is None or value is False or value == [] or value == {}


MAX_STOP, MAX_STOP_CHARS = 4, 256  # OpenAI: up to 4 stop sequences; each checked on every delta


def check_stop(stop: str | list[str]) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP:
        raise InvalidRequest(f"stop has {len(stops)} strings; at most {MAX_STOP} are allowed", "stop")
    long = [s for s in stops if len(s) > MAX_STOP_CHARS]
    if long:
        raise InvalidRequest(f"a stop string has {len(long[0])} characters; at most {MAX_STOP_CHARS} are allowed",
                             "stop")
    return stops


class _Body(BaseModel):
    # extras are collected (not dropped) so that reject_extras() can name them
    model_config = ConfigDict(extra="allow")

    def reject_extras(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if not _unset(value):
                raise InvalidRequest(f"unsupported parameter {name!r}: this server does not implement it; "
                                     "remove it from the request", name)


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallItem(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[a-zA-Z0-9_.:-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallItem] | None = None  # assistant
    tool_call_id: str | None = None  # tool


class _Sampling(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # None: the model config's default; 0: greedy
    top_p: float | None = None
    top_k: int | None = None  # llama-cpp-python extension
    repeat_penalty: float | None = None  # llama-cpp-python extension (HF repetition_penalty)
    min_tokens: int | None = None  # vLLM extension: EOS is masked until this many tokens were generated
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id: recorded nowhere, changes nothing

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``manager.astream``; rejects fields this engine cannot honour."""
        self.reject_extras()
        if self.n != 1:
            raise InvalidRequest(f"n={self.n} is not supported: this server returns one choice per request (n=1)", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value not in (None, 0, 0.0):
                raise InvalidRequest(f"{name}={value} is not supported (only 0); use repeat_penalty "
                                     "(multiplicative repetition penalty) instead", name)
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported by this server; remove it", "logit_bias")
        kw: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                              "top_k": self.top_k, "repetition_penalty": self.repeat_penalty,
                              "min_new_tokens": self.min_tokens}
        if self.stop is not None:
            kw["stop"] = check_stop(self.stop)
        if self.seed is not None:
            kw["seed"] = self.seed
        return {k: v for k, v in kw.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # one call per reply unless true: OpenAI defaults to several, but a small model allowed several
    # repeats its call until max_tokens (SmolLM2-135M does)
    parallel_tool_calls: bool | None = None

    def chat_messages(self) -> list[dict[str, str]]:
        """The engine's {role, content} messages: an assistant's tool calls and a tool's result written in
        the engine's tool-call format (engine/tool_calls.py), consecutive turns of one role merged."""
        from ..tool_calls import call_text, merge_roles, result_text

        out, called = [], {}
        for i, m in enumerate(self.messages):
            for extra, value in (m.model_extra or {}).items():
                if not _unset(value):
                    raise InvalidRequest(f"messages[{i}].{extra} is not supported by this server",
                                         f"messages[{i}].{extra}")
            content = m.content
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise InvalidRequest(f"messages[{i}].content[{j}] has type {part.type!r}; only text "
                                             "parts are supported", f"messages[{i}].content")
                    texts.append(part.text)
                content = "".join(texts)
            content = content or ""
            if m.tool_calls and m.role != "assistant":
                raise InvalidRequest(f"messages[{i}] has tool_calls but role {m.role!r}; only assistant messages "
                                     "carry tool calls", f"messages[{i}].tool_calls")
            if m.role == "tool":
                if m.tool_call_id not in called:
                    raise InvalidRequest(f"messages[{i}] is a tool result for tool_call_id {m.tool_call_id!r}, "
                                         "which no earlier assistant message's tool_calls has; send the "
                                         "assistant message with its tool_calls first",
                                         f"messages[{i}].tool_call_id")
                out.append({"role": "user", "content": result_text(called[m.tool_call_id], content)})
                continue
            for call in m.tool_calls or ():
                called[call.id] = call.function.name
                content += call_text(call.function.name, call.function.arguments)
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": content})
        return merge_roles(out) if called else out

    def tool_set(self):
        """The request's tools as an engine ToolSet (None: no tools, or tool_choice "none")."""
        choice = self.tool_choice
        if choice is not None and not isinstance(choice, (str, dict)):
            raise InvalidRequest("tool_choice must be 'none', 'auto', 'required' or "
                                 "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
        named = None
        if isinstance(choice, dict):
            named = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if not isinstance(named, str):
                raise InvalidRequest("tool_choice must be 'none', 'auto', 'required' or "
                                     "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
        elif choice not in (None, "none", "auto", "required"):
            raise InvalidRequest(f"tool_choice {choice!r} is not one of 'none', 'auto', 'required' or a named "
                                 "function", "tool_choice")
        if not self.tools:
            if choice == "required" or named is not None:
                raise InvalidRequest(f"tool_choice {choice!r} needs tools; the request has none", "tool_choice")
            return None
        if choice == "none":
            return None
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise InvalidRequest("two tools have the same name; tool names must be unique", "tools")
        tools = self.tools
        if named is not None:
            tools = [t for t in self.tools if t.function.name == named]
            if not tools:
                raise InvalidRequest(f"tool_choice names function {named!r}, which is not in tools "
                                     f"({', '.join(names)})", "tool_choice")
        final = None
        rf = self.response_format
        if rf is not None and rf.get("type") != "text":
            if rf.get("type") == "json_object":
                final = {"type": "object"}
            elif rf.get("type") == "json_schema" and isinstance((rf.get("json_schema") or {}).get("schema"), dict):
                final = rf["json_schema"]["schema"]
            else:
                raise InvalidRequest("with tools, response_format can be text, json_object or json_schema "
                                     "(the answer when no tool is called)", "response_format")
        from ..tool_calls import ToolSet

        return ToolSet(tuple({"type": "function", "function": t.function.model_dump(exclude_none=True)}
                             for t in tools),
                       required=choice == "required" or named is not None,
                       parallel=self.parallel_tool_calls is True, final=final)

    def sampling_kwargs(self) -> dict[str, Any]:
        kw = super().sampling_kwargs()
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise InvalidRequest("max_tokens and max_completion_tokens differ; give one of them",
                                     "max_completion_tokens")
            kw["max_tokens"] = self.max_completion_tokens
        tools = self.tool_set()
        if tools is not None:
            kw["tools"] = tools  # the answer's format (response_format) is the ToolSet's final
        elif self.response_format is not None and self.response_format.get("type") != "text":
            if importlib.util.find_spec("tta_engine.structured") is None:
                raise InvalidRequest("response_format needs structured-output support (tta_engine.structured), "
                                     "which this build lacks; drop response_format", "response_format")
            kw["response_format"] = self.response_format
        return kw


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for /v1/completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def prompt_text(self) -> str:
        if self.echo:
            raise InvalidRequest("echo=true is not supported by this server", "echo")
        for name in ("suffix", "logprobs"):
            if getattr(self, name) is not None:
                raise InvalidRequest(f"{name} is not supported by this server", name)
        if self.best_of not in (None, 1):
            raise InvalidRequest("best_of > 1 is not supported by this server", "best_of")
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise InvalidRequest(f"prompt is a list of {len(self.prompt)} strings; send one prompt per "
                                     "request", "prompt")
            return self.prompt[0]
        return self.prompt


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # extension: a text longer than the encoder's window is truncated to it (sentence-transformers'
    # behaviour) instead of answering 400
    truncate: bool = False

    def texts(self) -> list[str]:
        self.reject_extras()
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "tta-engine"
    type: str = Field(description="causal_lm or embedding")
    loaded: bool
