"""Pydantic-AI on tta-engine: ``TTAEngineModel("smollm2-135m-instruct")`` is a pydantic-ai ``Model`` served by
the engine's manager (its scheduler batches agent requests with the game's other traffic and reuses
prompt prefixes across turns), not by a second copy of the model.

- Messages are rendered with the model's chat template (system prompts and instructions as system
  messages, user prompts, tool results as user messages, earlier replies and tool calls as assistant
  messages).
- Structured output is enforced by constrained decoding (``response_format``, engine/structured.py):
  native and prompted output modes decode JSON valid for the output schema; in tool output mode and
  whenever function tools are offered, the reply is a call ``<tool>NAME</tool><parameters>{JSON}
  </parameters>`` to one of the listed tools (function tools and output tools) with arguments valid for its
  schema -- or, where the agent allows it, the final output (text, or JSON for the output schema) -- so
  tool calls always parse.
- ``request_stream`` streams text (and native JSON, which ``stream_output`` parses as it grows); a tool
  call is emitted as one part when complete.
- Settings honoured: ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop_sequences``,
  ``tool_choice``. Usage is the engine's token counts (prompt tokens, completion tokens).
- Engine errors surface as pydantic-ai's: a structured-output failure as ``UnexpectedModelBehavior`` (the
  raw text in ``body``), a full queue as ``ModelOverloadedError``, a context overflow as
  ``ModelContextWindowExceededError``, an unknown model as ``ModelNotFoundError``, others as
  ``ModelAPIError`` -- each with the engine's message.

Model ids: ``Agent(TTAEngineModel("smollm2-135m-instruct"))``, or ``Agent("tta-engine:smollm2-135m-instruct",
capabilities=[TTAEngineModels()])`` (pydantic-ai's ``infer_model`` has no registry for third-party
providers; a capability's ``resolve_model_id`` is its hook for model ids).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..errors import (
    ContextLengthError,
    OverloadedError,
    StructuredOutputError,
    TTAEngineError,
    UnknownModelError,
)
from ..generator import GenerationState
from ..tool_calls import (
    ToolCallStream,
    ToolSet,
    call_text,
    ended_with_calls,
    merge_roles,
    parse_tool_call,
    parse_tool_calls,
    result_text,
)
from .common import default_manager, require

require("pydantic_ai", "pydantic-ai")

from pydantic_ai import _utils  # noqa: E402
from pydantic_ai.capabilities import AbstractCapability  # noqa: E402
from pydantic_ai.exceptions import (  # noqa: E402
    ModelAPIError,
    ModelContextWindowExceededError,
    ModelNotFoundError,
    ModelOverloadedError,
    UnexpectedModelBehavior,
    UserError,
)
from pydantic_ai.messages import (  # noqa: E402
    ModelMessage,
    ModelRequest,
    ModelResponse,
    ModelResponsePart,
    ModelResponseStreamEvent,
    SystemPromptPart,
    TextContent,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import (  # noqa: E402
    Model,
    ModelRequestParameters,
    StreamedResponse,
    _sendable_request_parts,  # noqa: E402  (the request parts an adapter maps)
    check_allow_model_requests,
)
from pydantic_ai.models._tool_choice import resolve_tool_choice  # noqa: E402
from pydantic_ai.profiles import ModelProfile  # noqa: E402
from pydantic_ai.settings import ModelSettings  # noqa: E402
from pydantic_ai.usage import RequestUsage  # noqa: E402

__all__ = ["PROVIDER", "TTAEngineModel", "TTAEngineModels", "TTAEngineStreamedResponse"]

PROVIDER = "tta-engine"
_FINISH = {"stop": "stop", "length": "length", "cancelled": "error"}

TTA_ENGINE_PROFILE = ModelProfile(
    supports_tools=True,
    supports_json_schema_output=True,
    supports_json_object_output=True,
    # the output schema is enforced by decoding JSON for it; the schema also goes into the instructions,
    # which small models need to choose sensible values
    default_structured_output_mode="native",
    native_output_requires_schema_in_instructions=True,
)


@contextmanager
def _engine_errors(model_name: str, *, in_stream: bool = False) -> Iterator[None]:
    """Engine errors as pydantic-ai's error types, the engine's message inside."""
    try:
        yield
    except StructuredOutputError as exc:
        raise UnexpectedModelBehavior(f"{model_name}: {exc}", body=getattr(exc, "raw_text", None)) from exc
    except OverloadedError as exc:
        raise ModelOverloadedError(model_name, str(exc), in_stream=in_stream) from exc
    except ContextLengthError as exc:
        raise ModelContextWindowExceededError(model_name, str(exc), in_stream=in_stream) from exc
    except UnknownModelError as exc:
        raise ModelNotFoundError(model_name, str(exc), in_stream=in_stream) from exc
    except TTAEngineError as exc:
        raise ModelAPIError(model_name, str(exc), in_stream=in_stream) from exc


@dataclass
class _Plan:
    """One request as the engine runs it: chat messages, the constraint, the tools a reply may call."""

    chat: list[dict[str, str]]
    response_format: Any
    tools: dict[str, dict[str, Any]]
    kwargs: dict[str, Any]


def _user_text(part: UserPromptPart) -> str:
    if isinstance(part.content, str):
        return part.content
    texts = []
    for item in part.content:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, TextContent):
            texts.append(item.content)
        elif type(item).__name__ == "CachePoint":  # a prompt-caching marker: prefix reuse is automatic here
            continue
        else:
            raise UserError(f"{PROVIDER} models take text only; got {type(item).__name__} in a user prompt")
    return "\n".join(texts)


@dataclass(init=False)
class TTAEngineModel(Model):
    """A pydantic-ai model served by tta-engine's manager: ``TTAEngineModel("smollm2-135m-instruct")``.

    ``manager``: the TransformersModelManager to use (default: the process-wide one shared by every
    integration). ``describe_tools``: put the tools' names, descriptions and parameter schemas in a system
    message (the grammar enforces the call format either way; small contexts may want it off).
    """

    # generic settings the engine does not implement (it does: max_tokens, temperature, top_p, top_k, seed,
    # stop_sequences, tool_choice, parallel_tool_calls (default off: one call per reply))
    unsupported_settings = frozenset({"timeout", "max_retries", "presence_penalty", "frequency_penalty",
                                      "logit_bias", "extra_headers", "extra_body", "service_tier", "citations"})
    _unsupported_file_inputs = frozenset({"image", "document", "audio", "video"})

    _model_name: str = field(repr=False)
    _manager: Any = field(repr=False)
    describe_tools: bool = True

    def __init__(self, model_name: str, manager=None, *, settings: ModelSettings | None = None,
                 profile: ModelProfile | None = None, describe_tools: bool = True):
        self._model_name = model_name
        self._manager = manager
        self.describe_tools = describe_tools
        super().__init__(settings=settings, profile=TTA_ENGINE_PROFILE if profile is None else profile)

    @property
    def manager(self):
        if self._manager is None:
            self._manager = default_manager()
        return self._manager

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def system(self) -> str:
        return PROVIDER

    @property
    def provider(self) -> None:
        return None

    # -- mapping ----------------------------------------------------------------------------------------
    def _chat(self, messages: list[ModelMessage], params: ModelRequestParameters) -> list[dict[str, str]]:
        chat: list[dict[str, str]] = []
        for message in messages:
            if isinstance(message, ModelRequest):
                for part in _sendable_request_parts(message.parts):
                    if isinstance(part, SystemPromptPart):
                        chat.append({"role": "system", "content": part.content})
                    elif isinstance(part, UserPromptPart):
                        chat.append({"role": "user", "content": _user_text(part)})
                    elif isinstance(part, ToolReturnPart):
                        chat.append({"role": "user", "content": result_text(part.tool_name,
                                                                            part.model_response_str())})
                    else:
                        raise UserError(f"{PROVIDER} cannot render a {type(part).__name__} request part; call "
                                        "model.prepare_messages(messages) first (Agent does this for you)")
            elif isinstance(message, ModelResponse):
                pieces = []
                for part in message.parts:
                    if isinstance(part, TextPart):
                        pieces.append(part.content)
                    elif isinstance(part, ToolCallPart):
                        pieces.append(call_text(part.tool_name, part.args_as_json_str()))
                    # thinking, files and native-tool parts of other providers are not sent back
                if pieces:
                    chat.append({"role": "assistant", "content": "".join(pieces)})
        instructions = self._get_instruction_parts(messages, params) or []
        lead = next((i for i, m in enumerate(chat) if m["role"] != "system"), len(chat))
        chat[lead:lead] = [{"role": "system", "content": p.content} for p in instructions]
        return chat

    def _plan(self, messages: list[ModelMessage], settings: ModelSettings | None,
              params: ModelRequestParameters) -> _Plan:
        settings = settings or {}
        chat = self._chat(messages, params)
        choice = resolve_tool_choice(settings, params)
        defs = params.declared_tool_defs
        if choice == "none":
            names: set[str] = set()
        elif isinstance(choice, tuple):
            names = set(choice[1])
        else:
            names = set(defs)
        required = choice == "required" or (isinstance(choice, tuple) and choice[0] == "required")
        offered = tuple({"type": "function", "function": {"name": n, "description": defs[n].description or "",
                                                          "parameters": defs[n].parameters_json_schema}}
                        for n in defs if n in names)
        schema = None
        if params.output_mode in ("native", "prompted") and params.output_object is not None:
            schema = params.output_object.json_schema
        final = None if required else ("json" if schema is not None else ("text" if params.allow_text_output
                                                                          else None))
        kwargs = _sampling(settings)
        if offered:
            # a reply is a call, or (where the agent allows it) the final output: prose, or JSON for the schema
            kwargs["tools"] = tools = ToolSet(offered, required=final is None, final=schema if final == "json" else None,
                                              parallel=bool(settings.get("parallel_tool_calls", False)),
                                              describe=self.describe_tools)
            return _Plan(merge_roles(chat), None, tools.schemas(), kwargs)
        if schema is not None:
            name = params.output_object.name or "output"
            response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        elif final is None:
            raise UserError(f"{PROVIDER}: the request allows neither text nor a tool call")
        else:
            response_format = None
        return _Plan(merge_roles(chat), response_format, {}, kwargs)

    def _parts(self, text: str, plan: _Plan) -> list[ModelResponsePart]:
        if not plan.tools:
            return [TextPart(text)] if text else []
        with _engine_errors(self._model_name):
            reply = parse_tool_calls(text, plan.tools)
            if not reply.calls and plan.kwargs["tools"].required:  # cut off before the call (max_tokens)
                parse_tool_call(text, plan.tools)  # raises: no call in the output
        if not reply.calls:
            return [TextPart(text)] if text else []
        prose = [TextPart(reply.text)] if reply.text else []
        return prose + [ToolCallPart(c.name, c.arguments) for c in reply.calls]

    # -- requests ---------------------------------------------------------------------------------------
    async def request(self, messages: list[ModelMessage], model_settings: ModelSettings | None,
                      model_request_parameters: ModelRequestParameters) -> ModelResponse:
        check_allow_model_requests()
        model_settings, params = self.prepare_request(model_settings, model_request_parameters)
        plan = self._plan(messages, model_settings, params)
        state = GenerationState(0)
        with _engine_errors(self._model_name):
            async for _ in self.manager.astream(plan.chat, self._model_name, state=state,
                                                response_format=plan.response_format, **plan.kwargs):
                pass
        completion = state.completion()
        parts = self._parts(completion["text"], plan)
        tool_call = ended_with_calls(completion["finish_reason"], any(isinstance(p, ToolCallPart) for p in parts))
        return ModelResponse(parts=parts, usage=_usage(completion["usage"]), model_name=self._model_name,
                             provider_name=PROVIDER,
                             finish_reason="tool_call" if tool_call else _FINISH.get(completion["finish_reason"]),
                             provider_details={"finish_reason": completion["finish_reason"],
                                               "timings": dict(completion["timings"])})

    @asynccontextmanager
    async def request_stream(self, messages: list[ModelMessage], model_settings: ModelSettings | None,
                             model_request_parameters: ModelRequestParameters,
                             run_context: Any = None) -> AsyncGenerator[StreamedResponse]:
        check_allow_model_requests()
        model_settings, params = self.prepare_request(model_settings, model_request_parameters)
        plan = self._plan(messages, model_settings, params)
        state = GenerationState(0)
        deltas = self.manager.astream(plan.chat, self._model_name, state=state,
                                      response_format=plan.response_format, **plan.kwargs)
        first: str | None = None
        try:
            with _engine_errors(self._model_name):  # errors before the first token surface here
                first = await deltas.__anext__()
        except StopAsyncIteration:
            first = None
        try:
            yield TTAEngineStreamedResponse(model_request_parameters=params, _model_name=self._model_name,
                                            _owner=self, _plan=plan, _state=state, _first=first, _deltas=deltas)
        finally:
            await deltas.aclose()


def _sampling(settings: ModelSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for ours, theirs in (("max_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("top_k", "top_k"), ("seed", "seed"), ("stop", "stop_sequences")):
        if theirs in settings and settings[theirs] is not None:
            kwargs[ours] = settings[theirs]
    return kwargs


def _usage(usage: dict[str, int]) -> RequestUsage:
    return RequestUsage(input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"])


@dataclass
class TTAEngineStreamedResponse(StreamedResponse):
    """The engine's text deltas as pydantic-ai stream events (a tool call is one part, once complete)."""

    _model_name: str
    _owner: TTAEngineModel
    _plan: _Plan
    _state: GenerationState
    _first: str | None
    _deltas: AsyncIterator[str]
    _timestamp: datetime = field(default_factory=_utils.now_utc)

    async def _all_deltas(self) -> AsyncIterator[str]:
        if self._first is None:
            return
        yield self._first
        with _engine_errors(self._model_name, in_stream=True):
            async for delta in self._deltas:
                yield delta

    async def _get_event_iterator(self) -> AsyncIterator[ModelResponseStreamEvent]:
        """Prose as text deltas as it comes; each tool call as one part once complete."""
        splitter = ToolCallStream(self._plan.tools) if self._plan.tools else None
        async for delta in self._all_deltas():
            with _engine_errors(self._model_name, in_stream=True):
                events = splitter.feed(delta) if splitter is not None else [("text", delta)]
            for event in self._events(events, splitter):
                yield event
        completion = self._state.completion()
        self._usage = _usage(completion["usage"])
        self.finish_reason = _FINISH.get(completion["finish_reason"])
        self.provider_details = {"finish_reason": completion["finish_reason"]}
        if splitter is not None:
            try:
                rest = splitter.finish()
            except StructuredOutputError:
                if not splitter.calls:  # cut off inside the only call
                    with _engine_errors(self._model_name, in_stream=True):
                        raise
                rest = []  # several calls, the last cut off by max_tokens: dropped
            for event in self._events(rest, splitter):
                yield event
            if ended_with_calls(completion["finish_reason"], bool(splitter.calls)):
                self.finish_reason = "tool_call"

    def _events(self, events: list, splitter) -> Iterator[ModelResponseStreamEvent]:
        for kind, value in events:
            if kind == "text":
                yield from self._parts_manager.handle_text_delta(vendor_part_id="content", content=value)
            else:
                yield self._parts_manager.handle_tool_call_part(
                    vendor_part_id=f"call-{len(splitter.calls)}", tool_name=value.name, args=value.arguments)

    async def close_stream(self) -> None:
        aclose = getattr(self._deltas, "aclose", None)
        if aclose is not None:
            await aclose()

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def provider_name(self) -> str:
        return PROVIDER

    @property
    def provider_url(self) -> None:
        return None

    @property
    def timestamp(self) -> datetime:
        return self._timestamp


@dataclass(init=False)
class TTAEngineModels(AbstractCapability[Any]):
    """Resolves ``"tta-engine:MODEL"`` model ids: ``Agent("tta-engine:smollm2-135m-instruct",
    capabilities=[TTAEngineModels()])`` (other ids are left to pydantic-ai)."""

    manager: Any = None

    def __init__(self, manager=None):
        self.manager = manager

    async def resolve_model_id(self, ctx, *, model_id: str) -> Model | None:
        prefix = PROVIDER + ":"
        if isinstance(model_id, str) and model_id.startswith(prefix):
            return TTAEngineModel(model_id[len(prefix):], self.manager)
        return None
