import json
import random
import sys
from pathlib import Path

import pytest
from tta_engine.errors import SamplingParamError
from tta_engine.textstream import IncrementalDetokenizer, StopStringMatcher

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import VOCAB_SIZE, tiny_tokenizer  # noqa: E402

FFFD = "\ufffd"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def sp_tok():
    """A Llama-style SentencePiece BPE: '▁' word prefixes, byte fallback, leading space stripped on decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    base.train_from_iterator(["Hello world, the lantern flickers in the quiet forest."] * 20,
                             trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                 show_progress=False))
    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):  # byte-fallback tokens are ordinary vocabulary entries, as in Llama
        vocab[f"<0x{b:02X}>"] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    sp = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1)])
    return PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def stream(tokenizer, ids, prompt_ids=None):
    d = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [d.push(i) for i in ids]
    return deltas, d.flush(), d


PIECES = ["Hello", " world", ",", " the", " lantern", " 🎉", "🎉", " 龍", "龍", "你好", " ✨", "!", " ", "\n",
          " forest", "quiet", "😀", " 🌲"]


def random_texts(n, seed):
    r = random.Random(seed)
    return ["".join(r.choice(PIECES) for _ in range(r.randint(1, 12))) for _ in range(n)]


# ---------------------------------------------------------------- incremental detokenizer

def test_emoji_and_cjk_are_held_until_complete(tok):
    for ch in ("🎉", "龍"):
        ids = tok.encode(ch)
        assert len(ids) >= 3  # really split into byte-level pieces
        deltas, rest, _ = stream(tok, ids)
        assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == ch and rest == ""
    deltas, rest, d = stream(tok, tok.encode("Hi 🎉 龍!"))
    assert "".join(deltas) + rest == "Hi 🎉 龍!"
    assert all(FFFD not in x for x in deltas)
    assert d.token_ids == tok.encode("Hi 🎉 龍!")


def test_flush_releases_an_incomplete_character(tok):
    ids = tok.encode("ok 🎉")[:-1]
    deltas, rest, _ = stream(tok, ids)
    assert "".join(deltas).rstrip() == "ok" and rest.endswith(FFFD)
    assert "".join(deltas) + rest == tok.decode(ids, skip_special_tokens=True)


def test_text_streams_exactly_with_valid_deltas(tok, sp_tok):
    for tokenizer in (tok, sp_tok):
        for text in random_texts(150, seed=1):
            ids = tokenizer.encode(text)
            deltas, rest, _ = stream(tokenizer, ids)
            assert "".join(deltas) + rest == tokenizer.decode(ids, skip_special_tokens=True)
            if tokenizer is tok:  # byte-level BPE round-trips exactly
                assert "".join(deltas) + rest == text
            for x in deltas:
                assert FFFD not in x
                x.encode("utf-8")  # strict: no lone surrogates


def test_random_id_sequences_concatenate_to_full_decode(tok):
    r = random.Random(0)
    for _ in range(400):
        ids = [r.randrange(VOCAB_SIZE) for _ in range(r.randint(1, 40))]  # specials and broken bytes too
        deltas, rest, _ = stream(tok, ids)
        assert "".join(deltas) + rest == tok.decode(ids, skip_special_tokens=True)
        for x in deltas:
            x.encode("utf-8")


def test_sentencepiece_leading_spaces_survive(sp_tok):
    ids = sp_tok.encode("Hello world, the forest")
    assert [sp_tok.decode([i]) for i in ids][1].startswith("wor")  # naive per-token decode loses the space
    deltas, rest, _ = stream(sp_tok, ids)
    assert "".join(deltas) + rest == "Hello world, the forest"
    assert any(x.startswith(" ") for x in deltas)


def test_prompt_context(tok, sp_tok):
    for tokenizer in (tok, sp_tok):
        prompt = tokenizer.encode("the quiet forest")
        for text in random_texts(40, seed=2):
            gen = tokenizer.encode(" " + text)[1:] if tokenizer is sp_tok else tokenizer.encode(text)
            full = tokenizer.decode(prompt + gen, skip_special_tokens=True)
            want = full[len(tokenizer.decode(prompt, skip_special_tokens=True)):]
            deltas, rest, _ = stream(tokenizer, gen, prompt_ids=prompt)
            assert "".join(deltas) + rest == want


def test_special_tokens_are_skipped(tok):
    ids = tok.encode("Hi") + [tok.eos_token_id] + tok.encode(" 🎉")
    deltas, rest, _ = stream(tok, ids)
    assert "".join(deltas) + rest == "Hi 🎉"


# ---------------------------------------------------------------- stop strings

def run_stops(stops, deltas):
    m = StopStringMatcher(stops)
    out, stopped = [], False
    for x in deltas:
        text, stopped = m.push(x)
        out.append(text)
        if stopped:
            break
    return "".join(out), stopped, m


def test_stop_split_across_deltas():
    text, stopped, m = run_stops(["<|end|>"], ["Hello <|e", "nd|> ignored"])
    assert (text, stopped, m.matched) == ("Hello ", True, "<|end|>")
    assert m.flush() == "" and m.push("more") == ("", True)
    text, stopped, _ = run_stops(["THE END"], ["And so. TH", "E E", "ND", " after"])
    assert (text, stopped) == ("And so. ", True)


def test_text_before_a_possible_stop_is_emitted_at_once():
    m = StopStringMatcher(["THE END"])
    assert m.push("abc TH") == ("abc ", False)  # "TH" is held
    assert m.push("E EN") == ("", False)
    assert m.push("Dless") == ("", True)


def test_false_alarm_is_released():
    m = StopStringMatcher(["THE END"])
    assert m.push("THE E") == ("", False)
    assert m.push("X") == ("THE EX", False)
    assert m.push(" THE") == (" ", False)
    assert m.flush() == "THE"  # no stop: the held tail comes out at the end
    assert m.flush() == ""


def test_overlapping_prefixes_and_earliest_stop_wins():
    m = StopStringMatcher(["aab"])
    assert m.push("aa") == ("", False)
    assert m.push("a") == ("a", False)  # "aaa": only the tail "aa" can still start "aab"
    assert m.push("b") == ("", True)
    text, stopped, m = run_stops(["END", "STOP"], ["x STO", "P y END"])
    assert (text, stopped, m.matched) == ("x ", True, "STOP")


def test_no_stops_pass_through_and_validation():
    m = StopStringMatcher([])
    assert m.push("anything <|end|>") == ("anything <|end|>", False) and m.flush() == ""
    with pytest.raises(SamplingParamError):
        StopStringMatcher(["ok", ""])


def test_detokenizer_and_stop_matcher_together(tok):
    ids = tok.encode("The river 🎉 sings THE END and more")
    d, m = IncrementalDetokenizer(tok), StopStringMatcher(["THE END"])
    out, stopped = [], False
    for i in ids:
        text, stopped = m.push(d.push(i))
        out.append(text)
        if stopped:
            break
    assert stopped and "".join(out) == "The river 🎉 sings "
