"""The runtime's tokenizer + chat template (tokenizers + jinja2) against Transformers' own
``apply_chat_template`` / ``__call__`` / ``decode``: same text, same ids."""

from __future__ import annotations

import json

import pytest
from tiny_models import DECODER_ARCHS, tiny_tokenizer
from tta_engine.chat_template import render_chat
from tta_engine.errors import ArtifactError, ChatTemplateError
from tta_engine.tokenizer import Tokenizer

# Templates written like the real ones of each architecture family, using the features Transformers
# templates rely on: raise_exception, strftime_now, tojson, loop controls, namespace, trim/lstrip blocks.
LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|im_start|>system\\n\\n" }}
{%- if tools is not none %}{{- "Tools: " + tools | tojson(indent=4) + "\\n" }}{%- endif %}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|im_end|>" }}
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n\\n'+ message['content'] | trim + '<|im_end|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n\\n' }}{%- endif %}
"""
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<|im_start|>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{ message['content'] | trim }}
    {{ '<|im_end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>model\n' }}{%- endif -%}
"""
PHI3 = """{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|im_start|>system<|im_end|>' + message['content'] + '<|endoftext|>'}}{% elif message['role'] == 'user' %}{{'<|im_start|>user ' + message['content'] + '<|endoftext|>'}}{% elif message['role'] == 'assistant' %}{{'<|im_start|>assistant ' + message['content'] + '<|endoftext|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant' }}{% else %}{{ eos_token }}{% endif %}"""
QWEN2 = """{%- set ns = namespace(seen_system=false) %}
{%- for message in messages %}
    {%- if loop.first and message.role != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
    {%- if message.role == 'system' %}{%- set ns.seen_system = true %}{%- endif %}
    {%- if message.role == 'tool' %}{%- continue %}{%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
TEMPLATES = {"chatml": None, "llama3": LLAMA3, "gemma3": GEMMA3, "phi3": PHI3, "qwen2": QWEN2}

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello there! 你好 😀"}],
    "system": [{"role": "system", "content": "You are a calm narrator."},
               {"role": "user", "content": "I open the door.  "}],
    "multi": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
              {"role": "assistant", "content": "Hello, traveller."}, {"role": "user", "content": "Where am I?"}],
}


def _pair(template_key: str):
    hf = tiny_tokenizer()
    if TEMPLATES[template_key] is not None:
        hf.chat_template = TEMPLATES[template_key]
    return hf, Tokenizer.from_transformers(hf)


@pytest.mark.parametrize("template_key", list(TEMPLATES))
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_rendering_and_ids_equal_transformers(template_key, conv, gen_prompt):
    hf, tok = _pair(template_key)
    msgs = CONVERSATIONS[conv]
    want_text = hf.apply_chat_template(msgs, add_generation_prompt=gen_prompt, tokenize=False)
    assert tok.apply_chat_template(msgs, add_generation_prompt=gen_prompt, tokenize=False) == want_text
    assert tok.apply_chat_template(msgs, add_generation_prompt=gen_prompt) == list(
        hf.apply_chat_template(msgs, add_generation_prompt=gen_prompt, tokenize=True))


def test_tools_are_rendered_with_transformers_tojson():
    hf, tok = _pair("llama3")
    tools = [{"type": "function", "function": {"name": "look", "description": "Look <around> & see",
                                                "parameters": {"type": "object", "properties": {}}}}]
    msgs = CONVERSATIONS["user"]
    want = hf.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=False) == want
    assert "<around> & see" in want  # no HTML escaping (Transformers' own tojson)


def test_raise_exception_is_a_typed_error():
    _, tok = _pair("gemma3")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template(bad, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat("{% for %}", bad)


def test_encode_decode_equal_transformers():
    hf, tok = _pair("chatml")
    texts = ["The lantern flickers.", "  spaces  and  emoji 🌲✨ ", "你好，世界。", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id)


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_exported_artifact_tokenizer_equals_source(arch, artifacts, tiny_dirs):
    from transformers import AutoTokenizer

    art = artifacts.get(f"tiny-{arch}")
    section = art.manifest["tokenizer"]
    assert section["file"] in art.manifest["files"] and section["chat_template"] in art.manifest["files"]
    assert section["special_token_ids"]["eos_token_id"] in art.manifest["decoder"]["eos_token_ids"]
    assert "generation" in art.manifest
    tok = Tokenizer.from_artifact(art.path, section)
    hf = AutoTokenizer.from_pretrained(tiny_dirs[arch])
    for msgs in CONVERSATIONS.values():
        for gen in (True, False):
            assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == list(
                hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True))


def test_encoder_artifact_truncates_like_transformers(artifacts, tiny_dirs):
    from transformers import AutoTokenizer
    from tta_engine.embeddings import OrtEncoder

    enc = OrtEncoder(artifacts.get("tiny-bert").path)
    hf = AutoTokenizer.from_pretrained(tiny_dirs["bert"])
    texts = ["short", "The river sings over smooth stones under the moon. " * 30]
    want = hf(texts, truncation=True, max_length=enc.max_seq_length)["input_ids"]
    assert enc.tokenizer.encode_batch(texts)["input_ids"] == want
    assert len(want[1]) == enc.max_seq_length


def test_previous_artifact_layout_is_rejected_with_reexport_hint(artifacts, tmp_path):
    import shutil

    from tta_engine.artifact import load_artifact

    old = tmp_path / "tiny-llama" / "fp32"
    shutil.copytree(artifacts.get("tiny-llama").path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="re-export"):
        load_artifact(old)
    with pytest.raises(ArtifactError, match="re-export"):
        Tokenizer.from_artifact(old, None)


@pytest.mark.e2e
def test_smollm2_template_and_ids_equal_transformers():
    from tta_engine.config import load_model_configs
    from tta_engine.sources import load_tokenizer, resolve_source

    cfg = load_model_configs()["smollm2-135m-instruct"]
    hf = load_tokenizer(cfg, resolve_source(cfg))
    tok = Tokenizer.from_transformers(hf)
    assert tok.chat_template
    for msgs in CONVERSATIONS.values():
        for gen in (True, False):
            text = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False) == text
            assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == list(
                hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True))
    ids = tok.encode("Once upon a time, in a quiet forest...")
    assert ids == hf("Once upon a time, in a quiet forest...")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
