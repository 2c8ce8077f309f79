"""Guidance on tta-engine, on tiny random models: constraints honoured token by token, KV reuse across a
program's calls, role blocks rendered with the model's chat template, streaming of program state."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

guidance = pytest.importorskip("guidance")

from guidance import assistant, gen, select, system, user  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402
from tta_engine.integrations.guidance import TTAEngine, chat_template_class, engine_of  # noqa: E402

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def manager(shared_manager):
    return shared_manager  # conftest's manager over the tiny fp32 artifacts (tiny-llama among them)


def test_model_is_a_guidance_model_on_the_managers_loaded_model(manager):
    lm = TTAEngine(MODEL, manager)
    assert isinstance(lm, guidance.models.Model)
    loaded, _ = manager.load_model(MODEL)
    assert engine_of(lm).backend is loaded.backend  # the manager's model, not a second copy
    assert MODEL in manager.loaded_models


def test_gen_regex_select_and_max_tokens_are_enforced(manager):
    lm = TTAEngine(MODEL, manager)
    out = lm + "Number: " + gen("n", regex=r"[0-9]{2,4}") + " mood: " + select(["calm", "tense", "bright"], name="m")
    assert re.fullmatch(r"[0-9]{2,4}", out["n"]), out["n"]
    assert out["m"] in ("calm", "tense", "bright")
    assert str(out).startswith("Number: " + out["n"] + " mood: ")
    out2 = lm + "Story: " + gen("s", max_tokens=5)
    assert len(engine_of(lm).tokenizer.encode(out2["s"].encode())) <= 6  # retokenization may split one


def test_gen_stop_string_ends_the_capture_and_is_withheld(manager):
    # greedy, so the free text is reproducible: stop at a piece of it and get exactly the text before
    # (a stop string after a regex trips an llguidance assertion with guidance's own Transformers backend
    # too, so plain generation is used here)
    lm = TTAEngine(MODEL, manager)
    prompts = ["The river sings", "You feel calm.", "A wise mentor", "Hello! ", "The lantern"]
    prompt, free = next((p, f) for p in prompts if len(f := (lm + p + gen("s", max_tokens=12))["s"]) >= 5)
    stop = free[3:5]
    out = lm + prompt + gen("s", stop=stop, max_tokens=12)
    assert out["s"] == free[: free.index(stop)]
    assert str(out) == prompt + out["s"]


def test_json_schema_and_pydantic(manager):
    class Item(BaseModel):
        model_config = ConfigDict(extra="forbid")  # else a random model may add keys until the context ends
        name: str = Field(max_length=12)
        weight: int = Field(ge=0, le=999)

    lm = TTAEngine(MODEL, manager)
    out = lm + "Item: " + guidance.json(name="item", schema=Item)
    Item.model_validate_json(out["item"])
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    out = lm + "Flag: " + guidance.json(name="flag", schema=schema)
    assert set(json.loads(out["flag"])) == {"ok"}


def test_successive_calls_prefill_only_the_new_text(manager):
    lm = TTAEngine(MODEL, manager)
    eng = engine_of(lm)
    prefix = "The lantern flickers as you step into the quiet forest. " * 2
    lm += prefix + gen("a", max_tokens=3, regex=r"[a-z ]{1,12}")
    before = eng.stats.prefilled_tokens
    prompt_len = len(eng.tokenizer.encode(str(lm).encode()))
    added = " You feel calm. Breathe in slowly."
    lm += added + select(["yes", "no"], name="b")
    lm += " and " + gen("c", max_tokens=3, regex=r"[a-z ]{1,12}")
    new_text_tokens = len(eng.tokenizer.encode((added + " and ").encode()))
    prefilled = eng.stats.prefilled_tokens - before
    # only the new text, the selected option and the generated tokens (+ a few re-tokenized at the
    # boundaries) run through the model: nothing near the ~70-token prefix
    assert prefilled <= new_text_tokens + 3 + 3 + 6, (prefilled, new_text_tokens, prompt_len)
    assert eng.stats.reused_tokens > prompt_len


def test_kv_reuse_gives_the_same_logits_as_a_fresh_prefill(manager):
    lm = TTAEngine(MODEL, manager)
    eng = engine_of(lm)
    ids = eng.tokenizer.encode(b"You feel calm. Breathe in slowly, and breathe out.")
    eng.get_logits(ids + eng.tokenizer.encode(b" The river"))
    reused = eng.get_logits(ids)["logits"]  # truncated cache + one token
    assert eng.get_logits(ids)["n_cached"] == len(ids)
    fresh = TTAEngine(MODEL, manager)
    ref = engine_of(fresh).get_logits(ids)["logits"]
    np.testing.assert_allclose(reused, ref, rtol=1e-4, atol=1e-4)


def test_a_short_prefix_request_keeps_the_longer_sequence_for_the_next_program(manager):
    """guidance asks for the logits of a short prefix (a role start) before a program's whole prompt:
    that must not throw away the prefix the previous program computed (it did: every run of a program
    over a 300-token system prompt prefilled all of it again)."""
    lm = TTAEngine(MODEL, manager)
    eng = engine_of(lm)
    long = eng.tokenizer.encode(b"You walk into the lantern-lit village. The baker waves. " * 3)
    eng.get_logits(long)
    before = eng.stats.prefilled_tokens
    eng.get_logits(long[:3])  # recomputes its last position only
    got = eng.get_logits(long + eng.tokenizer.encode(b" You wave back."))
    assert got["n_cached"] == len(long)
    assert eng.stats.prefilled_tokens - before == 1 + len(eng.tokenizer.encode(b" You wave back."))
    ref = engine_of(TTAEngine(MODEL, manager)).get_logits(long + eng.tokenizer.encode(b" You wave back."))
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
    eng.get_logits(long[:5] + [long[9]])  # a different token at position 5 overwrites: the tail is gone
    assert eng.get_logits(long)["n_cached"] == 5


def test_role_blocks_render_with_the_models_chat_template(manager):
    lm = TTAEngine(MODEL, manager)
    with system():
        lm += "You are a gentle narrator."
    with user():
        lm += "Hello"
    with assistant():
        lm += gen("reply", max_tokens=3)
    loaded, tok = manager.load_model(MODEL)
    rendered = tok.apply_chat_template([{"role": "system", "content": "You are a gentle narrator."},
                                        {"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                       tokenize=False)
    assert str(lm).startswith(rendered)
    cls = chat_template_class(tok)
    assert cls().get_role_start("user") == "<|im_start|>user\n" and cls().get_role_end("user") == "<|im_end|>\n"


def test_guidance_functions_and_streaming(manager):
    @guidance
    def mood(lm, name):
        return lm + "Mood: " + select(["calm", "tense"], name=name)

    lm = TTAEngine(MODEL, manager)
    out = lm + mood("m")
    assert out["m"] in ("calm", "tense")
    stream = lm.stream() + "Count: " + gen("n", regex=r"[0-9]{6}")
    states = [str(s) for s in stream]
    assert len(states) >= 2 and states[-1].startswith("Count: ")
    assert re.fullmatch(r"Count: [0-9]{6}", states[-1])
    assert all(states[-1].startswith(s) for s in states)  # program state grows


def test_bad_model_name_is_a_typed_error(manager):
    from tta_engine.errors import UnknownModelError

    with pytest.raises(UnknownModelError):
        TTAEngine("no-such-model", manager)


def test_lru_eviction_never_closes_the_model_under_a_guidance_program(artifacts, tiny_configs):
    """The guidance model holds the manager's model only while it runs: eviction between calls (another
    model loaded with max_loaded_models=1) reloads it; eviction during a call waits for it."""
    from tta_engine.manager import TransformersModelManager

    artifacts.get("tiny-qwen2", "fp32")
    m = TransformersModelManager(tiny_configs, artifacts_root=artifacts.root / "auto", max_loaded_models=1)
    try:
        lm = TTAEngine(MODEL, m)
        first = (lm + "Number: " + gen("n", regex=r"[0-9]{3}"))["n"]
        m.load_model("tiny-qwen2")  # evicts tiny-llama: its session is closed
        assert m.loaded_models == ["tiny-qwen2"]
        again = (lm + "Number: " + gen("n", regex=r"[0-9]{3}"))["n"]  # loads tiny-llama again
        assert again == first and MODEL in m.loaded_models
        eng = engine_of(lm)
        with m.hold(MODEL) as held:  # in use: loading the other model cannot evict it
            m.load_model("tiny-qwen2")
            assert MODEL in m.loaded_models and eng.get_logits([1, 2, 3])["logits"].shape[0] == 1
            assert held is eng.lm
    finally:
        m.close()
