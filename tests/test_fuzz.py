"""Property/fuzz suite over the public API (issue 9): prompts, messages, texts and sampling parameters of
every shape -- wrong types, NaN/inf, negative and huge numbers, empty and whitespace prompts, unknown
roles, lone surrogates, invalid UTF-8 bytes, prompts over the context, 10^6-character inputs.

Every call either succeeds or raises a ``TTAEngineError`` subclass (never another exception), finishes
within a per-call timeout (never hangs), and the manager still serves a normal request afterwards.
Cases are derandomized (the same ones every run; > 500 in all) and run on the tiny models."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tta_engine.errors import TTAEngineError
from tta_engine.inputs import ROLES

CALL_TIMEOUT_S = 60.0  # generous on a loaded 2-core CI machine; a hang is minutes
LM, EMB = "tiny-llama", "tiny-bert"
NORMAL = [{"role": "user", "content": "The lantern flickers."}]

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


class Message:
    """The game's message objects: attributes instead of keys."""

    def __init__(self, role, content):
        self.role, self.content = role, content


# -- strategies ------------------------------------------------------------------------------------------

junk = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                 st.binary(max_size=8), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                          st.integers(), max_size=2))
surrogates = st.builds(lambda a, s, b: a + s + b, st.text(max_size=8), st.sampled_from(["\ud800", "\udfff", "\udbff"]),
                       st.text(max_size=8))
long_texts = st.sampled_from(["forest " * 400, "x" * 5000, "🌲" * 700, "你好" * 600])  # over the 256-token context
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\n\t  ", "\x00", "\u200b", "<|im_end|>",
                                                         "<|im_start|>user"]),
                  surrogates, long_texts)
bad_bytes = st.one_of(st.binary(max_size=16), st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80"]))
roles = st.one_of(st.sampled_from(ROLES), st.sampled_from(["wizard", "", "USER", " user"]), junk)
contents = st.one_of(texts, junk)


def message():
    as_dict = st.builds(lambda r, c: {"role": r, "content": c}, roles, contents)
    partial = st.one_of(st.builds(lambda r: {"role": r}, roles), st.builds(lambda c: {"content": c}, contents))
    obj = st.builds(Message, roles, contents)
    return st.one_of(as_dict, as_dict, partial, obj, texts, junk)


messages = st.one_of(st.lists(message(), max_size=4), st.tuples(message()), st.lists(
    st.builds(lambda c: {"role": "user", "content": c}, texts), min_size=1, max_size=3))
prompts = st.one_of(texts, bad_bytes, junk, messages)

small_int = st.integers(1, 4)
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70),
                    st.floats(0, 2), junk)
sampling = st.fixed_dictionaries(
    {"max_tokens": st.one_of(small_int, small_int, small_int, st.integers(-5, 0), st.just(10**9), st.just(2**70), junk)},
    optional={
        "temperature": st.one_of(st.floats(0, 2), numbers),
        "top_p": st.one_of(st.floats(0, 1), numbers),
        "top_k": st.one_of(st.integers(0, 500), numbers),
        "repetition_penalty": st.one_of(st.floats(0.5, 2), numbers),
        "min_new_tokens": st.one_of(st.integers(0, 4), numbers),
        "seed": st.one_of(st.integers(0, 2**64), st.integers(-5, -1), numbers),
        "stop": st.one_of(st.lists(texts, max_size=3), texts, junk, st.lists(junk, max_size=2)),
        "stop_sequences": st.lists(st.text(min_size=1, max_size=3), max_size=2),
        "no_such_option": junk,
    })


# -- harness ---------------------------------------------------------------------------------------------

class Tally:
    cases = 0
    errors: dict[str, int] = {}


def check(manager, make_call) -> None:
    """Run one call with a timeout: a TTAEngineError is fine, anything else (or a hang) fails; then a
    normal request must still work."""
    Tally.cases += 1

    async def main():
        try:
            await asyncio.wait_for(make_call(), CALL_TIMEOUT_S)
        except TTAEngineError as exc:
            Tally.errors[type(exc).__name__] = Tally.errors.get(type(exc).__name__, 0) + 1
            await asyncio.wait_for(manager.generate(NORMAL, LM, max_tokens=2, temperature=0), CALL_TIMEOUT_S)

    asyncio.run(main())


@pytest.fixture(scope="module")
def fuzz_manager(shared_manager):
    yield shared_manager
    # the manager still serves both kinds of request, with nothing left in flight
    assert asyncio.run(shared_manager.generate(NORMAL, LM, max_tokens=3, temperature=0))
    assert len(shared_manager.get_embeddings(["calm"], EMB)[0]) == 64
    stats = shared_manager.stats()
    assert stats[LM]["in_flight"] == 0 and stats[EMB]["in_flight"] == 0


@FUZZ
@given(prompt=prompts, kwargs=sampling)
def test_generate_never_raises_untyped(fuzz_manager, prompt, kwargs):
    check(fuzz_manager, lambda: fuzz_manager.generate(prompt, LM, **kwargs))


@FUZZ
@given(prompt=prompts, kwargs=sampling, stop_after=st.integers(0, 3))
def test_astream_never_raises_untyped(fuzz_manager, prompt, kwargs, stop_after):
    async def consume():
        n = 0
        async for _ in fuzz_manager.astream(prompt, LM, **kwargs):
            n += 1
            if n > stop_after:  # leave early sometimes: the request is cancelled
                break

    check(fuzz_manager, consume)


@settings(FUZZ, max_examples=100)
@given(msgs=messages, kwargs=sampling)
def test_chat_messages_never_raise_untyped(fuzz_manager, msgs, kwargs):
    check(fuzz_manager, lambda: fuzz_manager.chat(msgs, LM, **kwargs) if isinstance(msgs, (list, tuple))
          else fuzz_manager.generate(msgs, LM, **kwargs))


emb_inputs = st.one_of(texts, bad_bytes, junk, st.lists(st.one_of(texts, texts, junk, bad_bytes), max_size=6),
                       st.tuples(texts, texts))


@FUZZ
@given(batch=emb_inputs, model=st.one_of(st.just(EMB), st.just(EMB), st.just(LM), st.text(max_size=4), junk))
def test_embeddings_never_raise_untyped(fuzz_manager, batch, model):
    check(fuzz_manager, lambda: fuzz_manager.aget_embeddings(batch, model))


@pytest.mark.parametrize("case", ["raw", "message", "stream", "embed"])
def test_million_character_inputs(fuzz_manager, case):
    big = "the quiet forest " * 58_824  # 10^6 characters
    assert len(big) >= 10**6
    calls = {
        "raw": lambda: fuzz_manager.generate(big, LM, max_tokens=2),
        "message": lambda: fuzz_manager.generate([{"role": "user", "content": big}], LM, max_tokens=2),
        "stream": lambda: fuzz_manager.generate_streaming(big + "\ud800", LM, None, max_tokens=2),
        "embed": lambda: fuzz_manager.aget_embeddings(big, EMB),
    }
    check(fuzz_manager, calls[case])


def test_enough_cases_ran():
    """Runs after the fuzz tests of this module (file order): the suite generated >= 500 cases."""
    if Tally.cases == 0:
        pytest.skip("the fuzz tests were deselected")
    assert Tally.cases >= 500, Tally.cases
    assert Tally.errors, "no case was rejected: the strategies generate no bad input"
