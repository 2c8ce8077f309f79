"""Chat templates rendered with jinja2 the way Transformers renders them (no Transformers needed).

The environment matches ``transformers.utils.chat_template_utils._compile_jinja_template``: an
``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension, a ``{% generation %}`` block (rendered as its body), the ``raise_exception`` and
``strftime_now`` globals and a ``tojson`` filter that does not escape HTML. Templates are rendered with
``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and the tokenizer's special tokens
(``bos_token``, ``eos_token``, ...), as ``apply_chat_template`` does.

This is the one place that turns messages into prompt text: the runtime, the export's validation
prompts and the benchmarks all call :func:`render_chat`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from .errors import ChatTemplateError


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _generation_extension():
    """``{% generation %}...{% endgeneration %}`` (Transformers' assistant-mask tracker): the body as is."""
    import jinja2
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    return GenerationBlock


@lru_cache(maxsize=1)
def _environment():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_generation_extension(), jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _parsed(source: str, how):
    """``how(environment, source)``; a template that does not compile raises ChatTemplateError."""
    import jinja2

    try:
        return how(_environment(), source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the model's chat template does not compile ({exc}); fix the template "
                                "in the source model and re-export it") from exc


@lru_cache(maxsize=16)
def compile_template(source: str):
    return _parsed(source, lambda env, src: env.from_string(src))


@lru_cache(maxsize=16)
def uses_tools(template: str | None) -> bool:
    """Whether ``template`` reads the ``tools`` variable (has a tools section, as Qwen's and Llama 3.1's do)."""
    if not template:
        return False
    from jinja2 import meta

    return "tools" in meta.find_undeclared_variables(_parsed(template, lambda env, src: env.parse(src)))


def plain_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    """The prompt of a model without a chat template: ``role: content`` lines (+ ``assistant:``)."""
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return text + "\nassistant:" if add_generation_prompt else text


def render_chat(template: str | None, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = True, special_tokens: Mapping[str, Any] | None = None,
                tools: Sequence[Mapping[str, Any]] | None = None, documents=None, **kwargs: Any) -> str:
    """Render ``messages`` with ``template`` (``plain_chat`` when the model has none)."""
    if not template:
        return plain_chat(messages, add_generation_prompt)
    import jinja2

    compiled = compile_template(template)
    context = {**(special_tokens or {}), **kwargs}
    try:
        return compiled.render(messages=list(messages), tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **context)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template rejected these messages: {exc}. "
                                "Change the messages (roles, order, content) to what the model accepts.") from exc
