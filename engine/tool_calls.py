"""Tool calls in one format, for the OpenAI server, LangChain and Pydantic-AI alike.

A call is ``<tool>NAME</tool><parameters>{JSON}</parameters>``; a reply may hold several (parallel calls),
optionally after free text ("auto"): the prose may contain ``<`` but never ``<tool>``, which starts the
calls. A tool's result goes back to the model as a user turn
``<tool_result>NAME</tool_result><content>TEXT</content>`` (small models' chat templates know no ``tool``
role; consecutive turns of one role are merged, as templates expect alternating roles).

- :func:`tool_call_format` builds the ``response_format`` (an llguidance Lark grammar) that constrains a
  reply to these shapes, with each call's parameters valid for that tool's JSON Schema;
- :func:`parse_tool_calls` / :func:`parse_tool_call` read a finished reply back (validated);
- :class:`ToolCallStream` splits a streamed reply into prose deltas (as they come) and calls (each as
  soon as its ``</parameters>`` is decoded);
- :func:`call_text`, :func:`result_text`, :func:`tools_prompt`, :func:`merge_roles` and
  :func:`with_system_hint` render a conversation with tools into the model's chat messages.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import StructuredOutputError
from .structured import (
    _check_schema,
    _close_objects,
    _is_pydantic_model,
    _lark_string,
    _schema_text,
    _with_json_options,
)

CALL_OPEN = "<tool>"
# prose: anything without "<tool>" (llguidance lexemes support & and ~)
_PROSE = r"TEXT: /(.|\n)*/ & ~/(.|\n)*<tool>(.|\n)*/"
_OPEN = r"OPEN: /(.|\n)*<tool>/ & ~/(.|\n)*<tool>(.|\n)+/"  # prose up to and including the first <tool>


@dataclass(frozen=True)
class ToolCall:
    """A parsed tool call: ``arguments`` is the validated JSON object; ``parsed`` the Pydantic instance
    when the tool was given as a Pydantic model (else None)."""

    name: str
    arguments: dict[str, Any]
    parsed: Any = None


@dataclass(frozen=True)
class ToolReply:
    """A finished reply: the prose before the first call (stripped) and every call, in order."""

    text: str
    calls: tuple[ToolCall, ...]


def _tool_items(tools: Any) -> list[tuple[str, Any]]:
    if not isinstance(tools, Mapping) or not tools:
        raise StructuredOutputError("tools must be a non-empty mapping of tool name -> parameters JSON Schema "
                                    "dict or Pydantic model class")
    items = []
    for name, params in tools.items():
        if not isinstance(name, str) or not name or "<" in name or not name.isprintable():
            raise StructuredOutputError(f"invalid tool name {name!r}: a non-empty printable string without '<'")
        items.append((name, params))
    return items


def tool_call_format(tools: Mapping[str, Any], text_first: bool = False, *, optional: bool = False,
                     parallel: bool = False, final: Any = None) -> dict[str, str]:
    """A ``response_format`` for a reply that calls ``tools`` (name -> parameters JSON Schema dict or
    Pydantic model class), each call's parameters valid for its tool.

    - default: exactly one call and nothing else;
    - ``text_first``: free text first (without ``<tool>``), then the call(s); with ``optional`` the calls
      may be left out (OpenAI's ``tool_choice="auto"``: the model answers in prose or calls);
    - ``parallel``: one or more calls (separated by optional whitespace) instead of one;
    - ``final`` (a JSON Schema or Pydantic model): the reply is either the call(s) or a JSON value valid
      for ``final`` (a structured final answer when the model needs no tool).
    """
    if final is not None and text_first:
        raise StructuredOutputError("tool_call_format: final (a JSON answer) and text_first (prose) exclude "
                                    "each other; pick one")
    if optional and not text_first and final is None:
        raise StructuredOutputError("tool_call_format: optional calls need text_first (prose) or final (JSON) "
                                    "as the alternative")
    rules, alts = [], []
    for i, (name, params) in enumerate(_tool_items(tools)):
        schema = _with_json_options(_schema_text(params, f"tool {name!r} parameters"))
        alts.append(f"body_{i}")
        rules.append(f'body_{i}: {_lark_string(name)} "</tool><parameters>" params_{i} "</parameters>"')
        rules.append(f"params_{i}: %json {schema}")
    more = " (SEP? call)*" if parallel else ""
    if final is not None:
        start = "start: calls | final"
        rules.append("final: %json " + _with_json_options(_schema_text(final, "final answer")))
    elif text_first:
        # the prose and the first "<tool>" are one lexeme (OPEN): llguidance's lexer cannot end a greedy
        # prose lexeme six bytes back when "<tool>" turns up, but OPEN ends exactly there
        start = "start: TEXT | OPEN first" if optional else "start: OPEN first"
    else:
        start = "start: calls"
    lines = [start, "calls: call" + more, "first: body" + more, 'call: "<tool>" body', "body: " + " | ".join(alts),
             *rules]
    if text_first:
        lines += [_PROSE, _OPEN]
    if parallel:
        lines.append("SEP: /[ \\t\\n]+/")
    return {"type": "grammar", "lark": "\n".join(lines)}


_CALL_HEAD = re.compile(r"\s*<tool>(.*?)</tool>\s*<parameters>\s*", re.DOTALL)
_CALL_END = re.compile(r"\s*</parameters>")
_JSON = json.JSONDecoder()


def _read_call(text: str, pos: int) -> tuple[str, str, int] | None:
    """(name, parameters text, end) of a complete call starting at ``pos`` (after optional whitespace);
    None when the text there is not (yet) a whole call. The parameters are read as one JSON value, so a
    string argument may itself contain ``</parameters>``."""
    m = _CALL_HEAD.match(text, pos)
    if m is None:
        return None
    try:
        _, end = _JSON.raw_decode(text, m.end())
    except json.JSONDecodeError:
        end = None
    if end is not None:
        close = _CALL_END.match(text, end)
        if close is not None:
            return m.group(1), text[m.end():end], close.end()
    close_at = text.find("</parameters>", m.end())  # not JSON: up to the tag (then fails as "not JSON")
    if close_at >= 0:
        return m.group(1), text[m.end():close_at], close_at + len("</parameters>")
    return None


def _validated(name: str, raw: str, known: Mapping[str, Any], text: str) -> ToolCall:
    name = name.strip()
    if name not in known:
        raise StructuredOutputError(f"the output calls unknown tool {name!r}; tools: {', '.join(known)}",
                                    raw_text=text)
    params = known[name]
    try:
        arguments = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StructuredOutputError(f"the parameters of tool {name!r} are not JSON: {exc}", raw_text=text) from exc
    if not isinstance(arguments, dict):
        raise StructuredOutputError(f"the parameters of tool {name!r} are not a JSON object", raw_text=text)
    if _is_pydantic_model(params):
        from pydantic import ValidationError

        try:
            parsed = params.model_validate(arguments)
        except ValidationError as exc:
            raise StructuredOutputError(f"the parameters of tool {name!r} do not validate: {exc}",
                                        raw_text=text) from exc
        return ToolCall(name, arguments, parsed)
    _check_schema(arguments, json.loads(_schema_text(params, f"tool {name!r} parameters")), text)
    return ToolCall(name, arguments)


def parse_tool_calls(text: str, tools: Mapping[str, Any]) -> ToolReply:
    """The prose and every call of a finished reply, validated against ``tools``. The calls are the
    run of complete calls from the first ``<tool>`` on; text after them is ignored. Raises
    :class:`StructuredOutputError` (with ``raw_text``) when a call names an unknown tool, its parameters do
    not validate, or a ``<tool>`` starts no complete call."""
    known = dict(_tool_items(tools))
    start = text.find(CALL_OPEN)
    if start < 0:
        return ToolReply(text.strip(), ())
    calls, pos = [], start
    while True:
        found = _read_call(text, pos)
        if found is None:
            break
        calls.append(_validated(found[0], found[1], known, text))
        pos = found[2]
    if not calls:
        raise StructuredOutputError("the output starts a <tool> call that does not complete as "
                                    "<tool>NAME</tool><parameters>{...}</parameters>", raw_text=text)
    return ToolReply(text[:start].strip(), tuple(calls))


def parse_tool_call(text: str, tools: Mapping[str, Any]) -> ToolCall:
    """The first call of ``text`` (see :func:`parse_tool_calls`); raises :class:`StructuredOutputError`
    when there is none."""
    reply = parse_tool_calls(text, tools)
    if not reply.calls:
        raise StructuredOutputError("no <tool>NAME</tool><parameters>{...}</parameters> call in the output",
                                    raw_text=text)
    return reply.calls[0]


def _held_suffix(text: str) -> int:
    """Length of the longest suffix of ``text`` that could begin ``<tool>`` (held back from the prose)."""
    for k in range(min(len(text), len(CALL_OPEN) - 1), 0, -1):
        if CALL_OPEN.startswith(text[-k:]):
            return k
    return 0


class ToolCallStream:
    """Splits streamed deltas of a tool-call reply: ``feed(delta)`` and ``finish()`` return events,
    ``("text", str)`` for prose (everything but a possible start of ``<tool>``, as it comes) and
    ``("call", ToolCall)`` for each call once complete and validated. ``finish()`` raises
    :class:`StructuredOutputError` when the reply ends inside a call (e.g. at max_tokens)."""

    def __init__(self, tools: Mapping[str, Any]):
        self._known = dict(_tool_items(tools))
        self._buf = ""
        self._text = ""  # everything fed, for error messages
        self.in_calls = False
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> list[tuple[str, Any]]:
        self._text += delta
        self._buf += delta
        events: list[tuple[str, Any]] = []
        if not self.in_calls:
            at = self._buf.find(CALL_OPEN)
            if at < 0:
                keep = _held_suffix(self._buf)
                out, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                return [("text", out)] if out else []
            if at:
                events.append(("text", self._buf[:at]))
            self._buf, self.in_calls = self._buf[at:], True
        while (found := _read_call(self._buf, 0)) is not None:
            call = _validated(found[0], found[1], self._known, self._text)
            self.calls.append(call)
            events.append(("call", call))
            self._buf = self._buf[found[2]:]
        return events

    def finish(self) -> list[tuple[str, Any]]:
        if not self.in_calls:
            out, self._buf = self._buf, ""
            return [("text", out)] if out else []
        if self._buf.lstrip().startswith("<") or not self.calls:  # (text after the calls is ignored)
            raise StructuredOutputError("the output ended inside a <tool> call (max_tokens?); raise max_tokens",
                                        raw_text=self._text)
        return []


def ended_with_calls(finish_reason: str | None, called: bool) -> bool:
    """Whether a reply counts as a tool-call turn: it has calls and ended on its own ("stop"); a reply cut
    off by max_tokens keeps the finish reason "length" even with complete calls before the cut."""
    return called and finish_reason == "stop"


# --- rendering a conversation with tools -----------------------------------------------------------------

def call_text(name: str, arguments: Mapping[str, Any] | str) -> str:
    """A call as the model writes it (``arguments``: a dict, or its JSON text)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f"<tool>{name}</tool><parameters>{args}</parameters>"


def result_text(name: str, content: str, *, error: bool = False) -> str:
    """A tool's result as the model reads it (a user turn)."""
    label = f"{name} (error)" if error else name
    return f"<tool_result>{label}</tool_result><content>{content}</content>"


def _format_hint(may_answer: bool, parallel: bool) -> str:
    hint = "To call a tool, reply with <tool>NAME</tool><parameters>{JSON arguments}</parameters>"
    hint += "; you may make several calls in a row." if parallel else "."
    if may_answer:
        hint += " When you need no tool, answer in plain text instead."
    return hint + " A tool's result comes back as <tool_result>NAME</tool_result><content>RESULT</content>."


def tools_prompt(tools: Mapping[str, Any], descriptions: Mapping[str, str] | None = None, *,
                 may_answer: bool = True, parallel: bool = False) -> str:
    """The system hint that lists the tools (name, description, parameters JSON Schema) and the call
    format (the grammar enforces the format either way)."""
    lines = ["You can call these tools:"]
    for name, params in _tool_items(tools):
        desc = ((descriptions or {}).get(name) or "").strip()
        schema = json.dumps(json.loads(_schema_text(params, f"tool {name!r} parameters")), separators=(",", ":"))
        lines.append(f"- {name}" + (f": {desc}" if desc else "") + f" Parameters (JSON Schema): {schema}")
    lines.append(_format_hint(may_answer, parallel))
    return "\n".join(lines)


def merge_roles(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Consecutive messages of one role (system included) as one message: templates expect alternating
    turns, and a tool result after a user's question is two user turns in a row."""
    out: list[dict[str, str]] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def with_system_hint(messages: Sequence[Mapping[str, str]], hint: str) -> list[dict[str, str]]:
    """``hint`` appended to the leading system message (or as one, first); roles merged (merge_roles)."""
    msgs = merge_roles(messages)
    if msgs and msgs[0]["role"] == "system":
        msgs[0]["content"] = msgs[0]["content"] + "\n\n" + hint
        return msgs
    return [{"role": "system", "content": hint}, *msgs]


# --- the tools of one request ----------------------------------------------------------------------------

def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    fn = tool.get("function") if tool.get("type", "function") == "function" else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise StructuredOutputError(f"a tool must be {{'type': 'function', 'function': {{'name': ..., "
                                    f"'parameters': {{...}}}}}}; got {dict(tool)!r:.200}")
    return fn


@dataclass(frozen=True)
class ToolSet:
    """The tools one request offers, in OpenAI's function-tool shape (``{"type": "function", "function":
    {"name", "description", "parameters"}}``), and what the reply may be: ``required`` (one call at least;
    else prose or calls, OpenAI's "auto"), ``parallel`` (several calls in one reply), ``final`` (a JSON
    Schema: the reply is a call or a JSON answer instead of prose), ``describe`` (list the tools in the
    prompt). Passed as ``tools=`` to generation calls: the model renders it into its prompt
    (:meth:`messages`) and decodes under its grammar (:meth:`response_format`)."""

    tools: tuple[Mapping[str, Any], ...]
    required: bool = False
    parallel: bool = False
    final: Any = None
    describe: bool = True

    def __post_init__(self):
        if not self.tools:
            raise StructuredOutputError("a ToolSet needs at least one tool")
        for t in self.tools:
            _function(t)

    def schemas(self) -> dict[str, Any]:
        """{name: parameters JSON Schema} (an empty object when a tool takes none), with every object that
        lists properties closed unless it says otherwise (as OpenAI's strict mode): a small model cannot
        wander into keys nobody asked for."""
        out = {}
        for t in self.tools:
            fn = _function(t)
            schema = copy.deepcopy(fn.get("parameters") or {"type": "object", "properties": {}})
            _close_objects(schema)
            out[fn["name"]] = schema
        return out

    def response_format(self) -> dict[str, str]:
        if self.final is not None:
            return tool_call_format(self.schemas(), optional=not self.required, parallel=self.parallel,
                                    final=None if self.required else self.final)
        return tool_call_format(self.schemas(), text_first=not self.required, optional=not self.required,
                                parallel=self.parallel)

    def messages(self, messages: Sequence[Mapping[str, str]], template_has_tools: bool
                 ) -> tuple[list[dict[str, str]], list[dict[str, Any]] | None]:
        """(chat messages with the tools' system hint, the ``tools`` to render with the chat template or
        None). A template with a tools section lists the tools itself: the hint then gives only the call
        format; otherwise the hint lists names, descriptions and parameter schemas."""
        may_answer = not self.required
        if not self.describe:
            return merge_roles(messages), None
        if template_has_tools:
            return with_system_hint(messages, _format_hint(may_answer, self.parallel)), [dict(t) for t in self.tools]
        descriptions = {_function(t)["name"]: _function(t).get("description") or "" for t in self.tools}
        hint = tools_prompt(self.schemas(), descriptions, may_answer=may_answer, parallel=self.parallel)
        return with_system_hint(messages, hint), None
