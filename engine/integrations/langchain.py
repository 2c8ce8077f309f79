"""LangChain on the engine: ``ChatTTAEngine`` (a ``BaseChatModel``) and ``TTAEngineEmbeddings``.

Both run on a ``TransformersModelManager`` (the process-wide default one unless given ``manager=``).
``batch``/``abatch`` submit every input at once, so the manager's scheduler decodes them in shared
steps; ``with_structured_output`` and ``bind_tools`` constrain decoding (``response_format``; tools in the
engine's one tool-call format, engine/tool_calls.py), so the JSON or tool call always parses. Needs ``pip install 'tta-engine[langchain]'``.
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
        elif isinstance(block, dict) and block.get("type") in ("tool_call", "tool_use", "reasoning"):
            # a call block (LangChain's or Anthropic's shape): the calls are rendered from tool_calls
            continue
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise TTAEngineError(f"content block of type {kind!r} is not supported: the engine's models "
                                 "read text only; pass text content")
    return "".join(parts)


def to_engine_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as the engine's ``{role, content}`` dicts (rendered later with the model's chat
    template). An AI message's tool calls and a tool's result are written in the engine's one tool-call
    format (engine/tool_calls.py); consecutive turns of one role are merged."""
    from ..tool_calls import call_text, merge_roles, result_text

    out: list[dict[str, str]] = []
    for m in messages:
        if isinstance(m, SystemMessage):
            out.append({"role": "system", "content": _text(m.content)})
        elif isinstance(m, HumanMessage):
            out.append({"role": "user", "content": _text(m.content)})
        elif isinstance(m, AIMessage):
            text = _text(m.content) + "".join(call_text(c["name"], c["args"]) for c in m.tool_calls)
            out.append({"role": "assistant", "content": text})
        elif isinstance(m, ToolMessage):
            out.append({"role": "user", "content": result_text(m.name or "tool", _text(m.content),
                                                               error=getattr(m, "status", "success") == "error")})
        elif isinstance(m, ChatMessage):
            out.append({"role": m.role, "content": _text(m.content)})
        else:
            raise TTAEngineError(f"message type {type(m).__name__!r} is not supported; use System, Human, AI, "
                                 "Tool or Chat messages")
    return merge_roles(out)


def _closed(schema: Any) -> Any:
    """The schema with its objects closed (``additionalProperties: false`` unless it says otherwise), as
    OpenAI's strict mode does: a reply cannot wander into keys nobody asked for."""
    import copy

    from ..structured import _close_objects

    schema = copy.deepcopy(schema)
    _close_objects(schema)
    return schema


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
    describe_tools: bool = True
    """List bound tools (names, descriptions, parameter schemas) and the call format in a system message
    (or the chat template's tools section). Off: nothing is added to the prompt, the grammar alone
    enforces the calls (for very small contexts)."""

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
        parse_tools = None
        parallel = bool(kwargs.pop("parallel_tool_calls", False))
        if kwargs:
            raise TTAEngineError(f"unsupported argument(s) {', '.join(sorted(kwargs))} for ChatTTAEngine; known: "
                                 f"model, tools, tool_choice, parallel_tool_calls, response_format, "
                                 f"{', '.join(_SAMPLING)}")
        if tools:
            chosen, required = _selected_tools(tools, tool_choice)
            if chosen:
                from ..tool_calls import ToolSet

                call["tools"] = ts = ToolSet(tuple(chosen), required=required, parallel=parallel,
                                              describe=self.describe_tools)
                parse_tools = ts.schemas()
        elif response_format is not None:
            call["response_format"] = response_format
        return name, msgs, call, parse_tools

    def _message(self, text: str, parse_tools: dict | None, usage: dict, finish: str, name: str,
                 constrained: bool = False) -> AIMessage:
        """The reply as an AIMessage: prose as content, every complete call in ``tool_calls`` (a call cut
        off by max_tokens is dropped; with no complete call that is a StructuredOutputError, as is JSON
        cut off under response_format)."""
        from ..errors import StructuredOutputError

        if constrained and finish == "length" and parse_tools is None:
            raise StructuredOutputError("the output hit max_tokens before the grammar was complete; raise "
                                        "max_tokens", raw_text=text)
        tool_calls = []
        if parse_tools is not None:
            from ..tool_calls import parse_tool_calls

            reply = parse_tool_calls(text, parse_tools)
            tool_calls = [_tool_call(c) for c in reply.calls]
            if tool_calls:
                text = reply.text
        return AIMessage(content=text, tool_calls=tool_calls, usage_metadata=_usage(usage),
                         response_metadata=_meta(name, finish, bool(tool_calls)))

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
                            constrained="response_format" in call or "tools" in call)
        return ChatResult(generations=[ChatGeneration(message=msg)])

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            from langchain_core.language_models.chat_models import generate_from_stream

            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        return run_sync(self._agenerate(messages, stop, None, **kwargs))

    async def _chunks(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
                      ) -> AsyncIterator[ChatGenerationChunk]:
        """Text deltas as chunks as they come (prose too when tools are bound), each tool call as one chunk
        once it is complete, then a last chunk with usage and finish reason."""
        from ..errors import StructuredOutputError

        name, msgs, call, parse_tools = self._request(messages, stop, kwargs)
        state = GenerationState(0)
        splitter = None
        if parse_tools is not None:
            from ..tool_calls import ToolCallStream

            splitter = ToolCallStream(parse_tools)
        held: list[str] = []  # a response_format reply, checked at the end
        stream = self._manager.astream(msgs, name, state=state, **call)
        try:
            async for delta in stream:
                held.append(delta)
                for kind, value in splitter.feed(delta) if splitter is not None else [("text", delta)]:
                    yield ChatGenerationChunk(message=self._chunk(kind, value, splitter))
        finally:
            await stream.aclose()
        c = state.completion()
        if splitter is not None:
            try:
                rest = splitter.finish()
            except StructuredOutputError:
                if not splitter.calls:
                    raise
                rest = []  # several calls, the last one cut off by max_tokens: dropped
            for kind, value in rest:
                yield ChatGenerationChunk(message=self._chunk(kind, value, splitter))
        elif "response_format" in call:
            self._message("".join(held), None, c["usage"], c["finish_reason"], name, constrained=True)
        called = splitter is not None and bool(splitter.calls)
        yield ChatGenerationChunk(message=AIMessageChunk(
            content="", usage_metadata=_usage(c["usage"]), response_metadata=_meta(name, c["finish_reason"], called),
            chunk_position="last"))

    @staticmethod
    def _chunk(kind: str, value: Any, splitter) -> AIMessageChunk:
        if kind == "text":
            return AIMessageChunk(content=value)
        tc = _tool_call(value)
        return AIMessageChunk(content="", tool_call_chunks=[{
            "name": tc["name"], "args": _json(tc["args"]), "id": tc["id"], "index": len(splitter.calls) - 1,
            "type": "tool_call_chunk"}])

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
        a tool name (that tool), "none". ``parallel_tool_calls=True``: several calls per reply (default one:
        a small model allowed several tends to repeat its call until max_tokens)."""
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
            elif is_pydantic and hasattr(schema, "model_json_schema"):
                response_format = schema
            else:  # a JSON schema, TypedDict, OpenAI tool, or a Pydantic v1 model (its schema via LangChain)
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


def _tool_call(call) -> dict[str, Any]:
    return {"name": call.name, "args": dict(call.arguments), "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "tool_call"}


def _usage(usage: dict) -> dict[str, int]:
    return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"]}


def _meta(name: str, finish: str, called: bool) -> dict[str, Any]:
    """"tool_calls" when the reply ended (not cut off by max_tokens) with calls, as OpenAI reports it."""
    from ..tool_calls import ended_with_calls

    return {"model_name": name, "model_provider": "tta_engine",
            "finish_reason": "tool_calls" if ended_with_calls(finish, called) else finish}


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
