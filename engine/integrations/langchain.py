"""LangChain on the engine: ``ChatTTAEngine`` (a ``BaseChatModel``) and ``TTAEngineEmbeddings``.

Both run on a ``TransformersModelManager`` (the process-wide default one unless given ``manager=``).
``batch``/``abatch`` submit every input at once, so the manager's scheduler decodes them in shared
steps; ``with_structured_output`` and ``bind_tools`` constrain decoding (``response_format``), so the
JSON or tool call always parses. Needs ``pip install 'tta-engine[langchain]'``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any

from ..errors import TTAEngineError
from ..generator import GenerationState
from .common import (
    DEFAULT_CHAT_MODEL,
    DEFAULT_EMBEDDING_MODEL,
    default_manager,
    iterate_sync,
    require,
    run_sync,
)

require("langchain_core", "langchain")

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_core.language_models import BaseChatModel, LanguageModelInput  # noqa: E402
from langchain_core.messages import (  # noqa: E402
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser  # noqa: E402
from langchain_core.output_parsers.openai_tools import (  # noqa: E402
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult  # noqa: E402
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough  # noqa: E402
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool  # noqa: E402
from langchain_core.utils.pydantic import is_basemodel_subclass  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

__all__ = ["ChatTTAEngine", "TTAEngineEmbeddings", "to_engine_messages"]

_SAMPLING = ("temperature", "max_tokens", "top_p", "top_k", "repetition_penalty", "min_new_tokens", "seed")


def _text(content: str | list) -> str:
    """The text of a message's content (a string, or a list of content blocks of which only text is
    supported by these text-only models)."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif isinstance(block, dict) and block.get("type") in ("tool_call", "reasoning"):
            continue
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise TTAEngineError(f"content block of type {kind!r} is not supported: the engine's models "
                                 "read text only; pass text content")
    return "".join(parts)


def _render_tool_call(name: str, args: dict) -> str:
    import json

    return f"<tool>{name}</tool><parameters>{json.dumps(args, ensure_ascii=False)}</parameters>"


def to_engine_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as the engine's ``{role, content}`` dicts (rendered later with the model's chat
    template). An AI message's tool calls are written in the game's tool-call format; a tool result is
    a user turn naming the tool (small models' templates know no ``tool`` role)."""
    out: list[dict[str, str]] = []
    for m in messages:
        if isinstance(m, SystemMessage):
            out.append({"role": "system", "content": _text(m.content)})
        elif isinstance(m, HumanMessage):
            out.append({"role": "user", "content": _text(m.content)})
        elif isinstance(m, AIMessage):
            text = _text(m.content) + "".join(_render_tool_call(c["name"], c["args"]) for c in m.tool_calls)
            out.append({"role": "assistant", "content": text})
        elif isinstance(m, ToolMessage):
            name = m.name or "tool"
            status = " (error)" if getattr(m, "status", "success") == "error" else ""
            out.append({"role": "user", "content": f"[result of {name}{status}] {_text(m.content)}"})
        elif isinstance(m, ChatMessage):
            out.append({"role": m.role, "content": _text(m.content)})
        else:
            raise TTAEngineError(f"message type {type(m).__name__!r} is not supported; use System, Human, AI, "
                                 "Tool or Chat messages")
    # consecutive turns of one role (e.g. a tool result after the user's question) are merged, since
    # several chat templates require alternating roles
    merged: list[dict[str, str]] = []
    for m in out:
        if merged and merged[-1]["role"] == m["role"] and m["role"] != "system":
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + "\n" + m["content"]}
        else:
            merged.append(m)
    return merged


def _closed(schema: Any) -> Any:
    """The schema with every object closed (``additionalProperties: false`` unless it says otherwise), as
    OpenAI's strict mode does: a reply cannot wander into keys nobody asked for."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if out.get("type") == "object" and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def _tool_schemas(tools: Sequence[dict]) -> dict[str, dict]:
    """{name: JSON schema of the arguments} of OpenAI-format tools (objects closed)."""
    return {t["function"]["name"]: _closed(t["function"].get("parameters") or {"type": "object", "properties": {}})
            for t in tools}


def _tools_prompt(tools: Sequence[dict]) -> str:
    """A short hint naming the tools (the grammar enforces names and parameters, so no schemas here)."""
    listed = "; ".join(f"{t['function']['name']}({', '.join((t['function'].get('parameters') or {}).get('properties', {}))})"
                       f": {t['function'].get('description', '').rstrip('.')}".strip() for t in tools)
    return f"Tools: {listed}. Call one as <tool>NAME</tool><parameters>{{JSON}}</parameters>."


def _with_system_hint(messages: list[dict[str, str]], hint: str) -> list[dict[str, str]]:
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + hint}, *messages[1:]]
    return [{"role": "system", "content": hint}, *messages]


def _selected_tools(tools: list[dict], tool_choice: Any) -> tuple[list[dict], bool]:
    """(the tools the reply may call, whether a call is required) for a LangChain ``tool_choice``."""
    if tool_choice in (None, "auto"):
        return tools, False
    if tool_choice == "none" or tool_choice is False:
        return [], False
    if tool_choice in ("any", "required") or tool_choice is True:
        return tools, True
    name = tool_choice
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    chosen = [t for t in tools if t["function"]["name"] == name]
    if not chosen:
        raise TTAEngineError(f"tool_choice {tool_choice!r} names no bound tool; bound: "
                             f"{', '.join(t['function']['name'] for t in tools)}")
    return chosen, True


class ChatTTAEngine(BaseChatModel):
    """A LangChain chat model served by tta-engine's model manager (in process, offline).

    ``ChatTTAEngine(model="smollm2-135m-instruct", temperature=0, max_tokens=128)``; pass
    ``manager=`` to share a ``TransformersModelManager`` with the rest of the game.
    """

    model_name: str = Field(default=DEFAULT_CHAT_MODEL, alias="model")
    manager: Any = Field(default=None, exclude=True)
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_new_tokens: int | None = None
    seed: int | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    timeout: float | None = None
    """Seconds one call may take (None: no limit)."""
    max_retries: int = 0
    """Accepted for compatibility; in-process requests are not retried."""
    streaming: bool = False
    """``invoke`` streams internally (callbacks get ``on_llm_new_token`` per delta)."""

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=())

    @property
    def _llm_type(self) -> str:
        return "tta-engine"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, **{k: getattr(self, k) for k in _SAMPLING}}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "tta_engine"
        params["ls_model_name"] = kwargs.get("model") or self.model_name
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop)
        return params

    @property
    def _manager(self):
        return self.manager if self.manager is not None else default_manager()

    # -- request building ---------------------------------------------------------------------------
    def _request(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
                 ) -> tuple[str, list[dict], dict[str, Any], dict[str, dict] | None]:
        """(model name, engine messages, manager kwargs, {tool: schema} when a tool call is parsed)."""
        kwargs = dict(kwargs)
        name = kwargs.pop("model", None) or self.model_name
        call: dict[str, Any] = {k: getattr(self, k) for k in _SAMPLING if getattr(self, k) is not None}
        call.update({k: kwargs.pop(k) for k in _SAMPLING if k in kwargs})
        stops = list(stop) if stop is not None else list(self.stop or [])
        if stops:
            call["stop"] = stops
        msgs = to_engine_messages(messages)
        tools, tool_choice = kwargs.pop("tools", None), kwargs.pop("tool_choice", None)
        response_format = kwargs.pop("response_format", None)
        kwargs.pop("ls_structured_output_format", None)
        kwargs.pop("stream", None)
        if kwargs:
            raise TTAEngineError(f"unsupported argument(s) {', '.join(sorted(kwargs))} for ChatTTAEngine; known: "
                                 f"model, tools, tool_choice, response_format, {', '.join(_SAMPLING)}")
        parse_tools = None
        if tools:
            chosen, required = _selected_tools(tools, tool_choice)
            if chosen:
                from ..structured import tool_call_format

                parse_tools = _tool_schemas(chosen)
                call["response_format"] = fmt = tool_call_format(parse_tools, text_first=not required)
                if not required:  # "auto": free text, optionally followed by one call
                    fmt["lark"] = fmt["lark"].replace("start: TEXT call\n", "start: TEXT call?\n", 1)
                msgs = _with_system_hint(msgs, _tools_prompt(chosen))
        elif response_format is not None:
            call["response_format"] = response_format
        return name, msgs, call, parse_tools

    def _message(self, text: str, parse_tools: dict | None, usage: dict, finish: str, name: str,
                 chunk: bool = False, constrained: bool = False):
        if constrained and finish == "length" and (parse_tools is None or "<tool>" in text):
            from ..errors import StructuredOutputError

            raise StructuredOutputError("the output hit max_tokens before the grammar was complete; raise "
                                        "max_tokens", raw_text=text)
        meta = {"model_name": name, "model_provider": "tta_engine", "finish_reason": finish}
        usage_md = {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                    "total_tokens": usage["total_tokens"]}
        tool_calls = []
        if parse_tools is not None and "<tool>" in text:
            from ..structured import parse_tool_call

            tc = parse_tool_call(text, parse_tools)
            tool_calls = [{"name": tc.name, "args": dict(tc.arguments), "id": f"call_{uuid.uuid4().hex[:24]}",
                           "type": "tool_call"}]
            text = text[: text.index("<tool>")].strip()
            meta["finish_reason"] = "tool_calls"
        if chunk:
            chunks = [{"name": c["name"], "args": _json(c["args"]), "id": c["id"], "index": i,
                       "type": "tool_call_chunk"} for i, c in enumerate(tool_calls)]
            return AIMessageChunk(content=text, tool_call_chunks=chunks, usage_metadata=usage_md,
                                  response_metadata=meta, chunk_position="last")
        return AIMessage(content=text, tool_calls=tool_calls, usage_metadata=usage_md, response_metadata=meta)

    async def _bounded(self, aw):
        return await (asyncio.wait_for(aw, self.timeout) if self.timeout else aw)

    # -- generation ---------------------------------------------------------------------------------
    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            from langchain_core.language_models.chat_models import agenerate_from_stream

            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        name, msgs, call, parse_tools = self._request(messages, stop, kwargs)
        c = await self._bounded(self._manager.complete(msgs, name, **call))
        msg = self._message(c["text"], parse_tools, c["usage"], c["finish_reason"], name,
                            constrained="response_format" in call)
        return ChatResult(generations=[ChatGeneration(message=msg)])

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            from langchain_core.language_models.chat_models import generate_from_stream

            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        return run_sync(self._agenerate(messages, stop, None, **kwargs))

    async def _chunks(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
                      ) -> AsyncIterator[ChatGenerationChunk]:
        """Text deltas as chunks, then a last chunk with usage, finish reason and any tool call (a tool
        call is streamed whole, at the end, once it parses)."""
        name, msgs, call, parse_tools = self._request(messages, stop, kwargs)
        state = GenerationState(0)
        held: list[str] = []
        stream = self._manager.astream(msgs, name, state=state, **call)
        try:
            async for delta in stream:
                if parse_tools is not None:
                    held.append(delta)
                else:
                    yield ChatGenerationChunk(message=AIMessageChunk(content=delta))
        finally:
            await stream.aclose()
        c = state.completion()
        last = self._message("".join(held), parse_tools, c["usage"], c["finish_reason"], name, chunk=True,
                             constrained="response_format" in call)
        yield ChatGenerationChunk(message=last)

    # LangChain's stream()/invoke() call on_llm_new_token for every chunk these yield
    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        yield from iterate_sync(self._chunks(messages, stop, kwargs))

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in self._chunks(messages, stop, kwargs):
            yield chunk

    # -- batching -----------------------------------------------------------------------------------
    def batch(self, inputs: list[LanguageModelInput], config=None, *, return_exceptions: bool = False,
              **kwargs: Any) -> list[Any]:
        """All inputs are submitted to the engine at once (its scheduler decodes them in shared steps),
        instead of LangChain's default of one thread per input."""
        if not inputs:
            return []
        return run_sync(self.abatch(inputs, config, return_exceptions=return_exceptions, **kwargs))

    # -- tools and structured output ----------------------------------------------------------------
    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | Any], *,
                   tool_choice: str | dict | bool | None = None, **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; replies are decoded under the game's tool-call grammar and come back as
        ``AIMessage.tool_calls``. ``tool_choice``: None/"auto" (text or a call), "any"/"required" (a call),
        a tool name (that tool), "none"."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        _selected_tools(formatted, tool_choice)  # a bad tool_choice fails here, not at the first call
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(self, schema: dict[str, Any] | type, *, include_raw: bool = False,
                               method: str = "json_schema", strict: bool | None = None,
                               **kwargs: Any) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """Replies constrained to ``schema`` (a Pydantic class: returns its validated instance; a JSON
        schema, TypedDict or OpenAI tool: returns a dict). ``method``: "json_schema" (default, the JSON
        itself is constrained), "function_calling" (a forced tool call), "json_mode" (any JSON object)."""
        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name,
                                  ls_structured_output_format={"kwargs": {"method": method}, "schema": schema})
            parser = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                      else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method in ("json_schema", "json_mode"):
            if method == "json_mode":
                response_format: Any = {"type": "json_object"}
            elif is_pydantic:
                response_format = schema
            else:
                js = convert_to_json_schema(schema)
                response_format = {"type": "json_schema", "json_schema": {
                    "name": js.get("title", "output"), "schema": _closed(js) if strict is not False else js,
                    "strict": strict is not False}}
            trace = {"ls_structured_output_format": {"kwargs": {"method": method}, "schema": schema}} if schema else {}
            llm = self.bind(response_format=response_format, **trace)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(f"method {method!r} is not supported; use 'json_schema', 'function_calling' "
                             "or 'json_mode'")
        if include_raw:
            parser_assign = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser,
                                                       parsing_error=lambda _: None)
            parser_none = RunnablePassthrough.assign(parsed=lambda _: None)
            return RunnableMap(raw=llm) | parser_assign.with_fallbacks([parser_none], exception_key="parsing_error")
        return llm | parser


def _json(args: dict) -> str:
    import json

    return json.dumps(args, ensure_ascii=False)


class TTAEngineEmbeddings(BaseModel, Embeddings):
    """LangChain embeddings from the engine's encoder (all-MiniLM-L6-v2 by default; vectors are
    normalized, cached per text by the manager)."""

    model_name: str = Field(default=DEFAULT_EMBEDDING_MODEL, alias="model")
    manager: Any = Field(default=None, exclude=True)

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=(), arbitrary_types_allowed=True)

    @property
    def _manager(self):
        return self.manager if self.manager is not None else default_manager()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        return self._manager.get_embeddings(list(texts), self.model_name)

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return (await self.aembed_documents([text]))[0]
