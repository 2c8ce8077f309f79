import numpy as np
import pytest
from tta_engine.errors import SamplingParamError
from tta_engine.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    make_rng,
    params_from_kwargs,
    process_logits,
    sample_batch,
    sample_token,
)

VOCAB = 49_152


def _logits(seed: int, n: int = VOCAB, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("name,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2),
    ("top_k", -1), ("top_k", 2.5),
    ("max_new_tokens", 0), ("max_new_tokens", -3), ("max_new_tokens", True),
    ("min_new_tokens", -1), ("min_new_tokens", 300),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("seed", -1), ("seed", 1.5),
    ("stop", ("ok", 3)), ("stop", ("",)), ("stop", 42),
])
def test_invalid_values_raise_naming_the_parameter(name, value):
    with pytest.raises(SamplingParamError) as err:
        SamplingParams(**{name: value})
    msg = str(err.value)
    assert name in msg and "allowed" in msg
    assert isinstance(err.value, ValueError)


def test_min_new_tokens_above_max_names_the_range():
    with pytest.raises(SamplingParamError, match=r"min_new_tokens=11.*max_new_tokens=10"):
        SamplingParams(max_new_tokens=10, min_new_tokens=11)
    assert SamplingParams(max_new_tokens=10, min_new_tokens=10).min_new_tokens == 10


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k) == (256, 0.7, 1.0, 0)
    assert p.stop == () and not p.is_greedy
    q = SamplingParams(stop=["a", "bc"], temperature=0, top_k=np.int64(5))
    assert q.stop == ("a", "bc") and isinstance(q.stop, tuple)
    assert q.is_greedy and q.temperature == 0.0 and type(q.top_k) is int
    assert SamplingParams(stop="END").stop == ("END",)
    hash(q)  # frozen, hashable


def test_params_from_kwargs_aliases_and_unknowns():
    p = params_from_kwargs(max_tokens=12, stop_sequences=["x"], temperature=0)
    assert p.max_new_tokens == 12 and p.stop == ("x",) and p.is_greedy  # 0 is greedy, not "default"
    base = SamplingParams(temperature=0.3, seed=7)
    q = params_from_kwargs(base, top_p=0.5, temperature=None)
    assert q.temperature == 0.3 and q.top_p == 0.5 and q.seed == 7
    assert params_from_kwargs(base, seed=None).seed is None
    with pytest.raises(SamplingParamError, match="frobnicate"):
        params_from_kwargs(frobnicate=1, temperature=0.2)
    with pytest.raises(SamplingParamError, match="max_new_tokens"):
        params_from_kwargs(max_tokens=5, max_new_tokens=6)
    with pytest.raises(SamplingParamError, match="top_p"):
        params_from_kwargs(top_p=2)


# ---------------------------------------------------------------- greedy and its limits

def test_greedy_equals_argmax_first_on_ties():
    rng = make_rng(0)
    greedy = SamplingParams(temperature=0)
    for s in range(20):
        x = _logits(s)
        assert sample_token(x, greedy, rng) == int(np.argmax(x))
    x = np.zeros(100, np.float32)
    x[[7, 3, 50]] = 5.0
    assert sample_token(x, greedy, rng) == 3
    assert sample_token(x, SamplingParams(top_k=1), rng) == 3


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.0])
def test_top_k_1_and_tiny_top_p_equal_greedy(temperature):
    rng = make_rng(1)
    for s in range(20):
        x = _logits(100 + s)
        am = int(np.argmax(x))
        assert sample_token(x, SamplingParams(temperature=temperature, top_k=1), rng) == am
        assert sample_token(x, SamplingParams(temperature=temperature, top_p=1e-9), rng) == am
        assert sample_token(x, SamplingParams(temperature=temperature, top_p=1e-9, top_k=20), rng) == am


def test_same_seed_same_sequence_different_seeds_differ():
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=200)
    xs = [_logits(s, scale=1.0) for s in range(50)]

    def run(seed):
        rng = make_rng(seed)
        return [sample_token(x, params, rng) for x in xs]

    assert run(123) == run(123)
    assert run(123) != run(124)


# ---------------------------------------------------------------- logits processing

def test_repetition_penalty_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers import RepetitionPenaltyLogitsProcessor

    gen = np.random.default_rng(5)
    for penalty in (0.7, 1.0, 1.3, 2.0):
        x = gen.standard_normal(1000).astype(np.float32)
        ids = gen.integers(0, 1000, size=60)  # with duplicates
        ref = RepetitionPenaltyLogitsProcessor(penalty)(
            torch.from_numpy(ids)[None], torch.from_numpy(x.copy())[None])[0].numpy()
        x_before = x.copy()
        ours = apply_repetition_penalty(x, ids, penalty)
        np.testing.assert_allclose(ours, ref, rtol=1e-6)
        np.testing.assert_array_equal(x, x_before)  # input untouched
        assert ours.dtype == np.float32


def test_repetition_penalty_rejects_bad_values():
    with pytest.raises(SamplingParamError, match="repetition_penalty"):
        apply_repetition_penalty(np.zeros(4), [1], 0.0)
    with pytest.raises(SamplingParamError, match="out of range"):
        apply_repetition_penalty(np.zeros(4), [4], 1.2)
    with pytest.raises(SamplingParamError, match="out of range"):
        apply_repetition_penalty(np.zeros(4), [-1], 1.2)


def test_process_logits_penalises_prompt_and_output():
    x = np.array([2.0, -2.0, 2.0, -2.0, 1.0], np.float32)
    p = SamplingParams(repetition_penalty=2.0)
    out = process_logits(x, p, generated_ids=[0], prompt_ids=[1])
    np.testing.assert_allclose(out, [1.0, -4.0, 2.0, -2.0, 1.0])
    np.testing.assert_allclose(process_logits(x, p, generated_ids=[0, 0]), [1.0, -2.0, 2.0, -2.0, 1.0])
    assert process_logits(x, SamplingParams(), generated_ids=[0]) is x  # nothing to do, no copy


def test_min_new_tokens_masks_eos():
    x = np.zeros(10, np.float32)
    x[2] = x[9] = 100.0  # both EOS ids are by far the most likely
    p = SamplingParams(temperature=0, min_new_tokens=3)
    rng = make_rng(0)
    for n in range(3):
        out = process_logits(x, p, generated_ids=[5] * n, eos_ids=[2, 9])
        assert np.isneginf(out[[2, 9]]).all() and x[2] == 100.0
        assert sample_token(out, p, rng) not in (2, 9)
        assert sample_token(out, SamplingParams(temperature=1.0, min_new_tokens=3), rng) not in (2, 9)
    out = process_logits(x, p, generated_ids=[5] * 3, eos_ids=[2, 9])
    assert sample_token(out, p, rng) == 2
    assert np.isneginf(process_logits(x, p, generated_ids=[5] * 5, eos_ids=[2], n_generated=1)[2])


# ---------------------------------------------------------------- distribution

def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    m = expected > 0
    assert counts[~m].sum() == 0, "sampled a token of probability 0"
    return float((((counts - expected) ** 2)[m] / expected[m]).sum())


def test_temperature_1_matches_softmax_frequencies():
    x = np.random.default_rng(3).standard_normal(12).astype(np.float32)
    probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    rng, params, n = make_rng(42), SamplingParams(temperature=1.0), 20_000
    counts = np.bincount([sample_token(x, params, rng) for _ in range(n)], minlength=12)
    assert _chi2(counts, probs) < 35.0  # 11 dof: p(chi2 > 35) ~ 2.5e-4


def test_top_k_and_top_p_truncate_and_renormalise():
    x = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    rng, n = make_rng(7), 20_000
    # top-k 3 at temperature 1: renormalised over {0, 1, 2}
    c = np.bincount([sample_token(x, SamplingParams(temperature=1.0, top_k=3), rng) for _ in range(n)],
                    minlength=6)
    p = np.array([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8
    assert _chi2(c, p) < 25.0
    # top-p 0.7: smallest set with cumulative >= 0.7 is {0, 1, 2} (0.8); 0.65 alone is not enough
    c = np.bincount([sample_token(x, SamplingParams(temperature=1.0, top_p=0.7), rng) for _ in range(n)],
                    minlength=6)
    assert _chi2(c, p) < 25.0
    # top-p 0.64 is reached by {0, 1} (0.65)
    c = np.bincount([sample_token(x, SamplingParams(temperature=1.0, top_p=0.64), rng) for _ in range(n)],
                    minlength=6)
    assert c[2:].sum() == 0 and c[0] > c[1] > 0


def test_large_vocab_nucleus_widens_beyond_first_candidates():
    # nearly flat over 49,152 tokens: the nucleus needs far more than the first 64 candidates
    x = _logits(9, scale=0.01)
    rng = make_rng(0)
    draws = {sample_token(x, SamplingParams(temperature=1.0, top_p=0.9), rng) for _ in range(300)}
    assert len(draws) > 250
    order = np.argsort(-x, kind="stable")
    rank = {int(t): r for r, t in enumerate(order)}
    assert max(rank[t] for t in draws) < int(0.92 * VOCAB)


def test_masked_everything_falls_back_to_argmax():
    x = np.full(8, -np.inf, np.float32)
    assert sample_token(x, SamplingParams(temperature=1.0), make_rng(0)) == 0


# ---------------------------------------------------------------- batch

def test_sample_batch_rows_match_sample_token():
    xs = np.stack([_logits(s, scale=1.0) for s in range(4)])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=50),
              SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(top_k=1)]
    got = sample_batch(xs, params, [make_rng(s) for s in range(4)])
    want = [sample_token(xs[r], params[r], make_rng(r)) for r in range(4)]
    assert got.tolist() == want and got.dtype == np.int64
    assert sample_batch(xs, SamplingParams(temperature=0), make_rng(0)).tolist() == np.argmax(xs, -1).tolist()
    with pytest.raises(ValueError, match="one params"):
        sample_batch(xs, params[:2], make_rng(0))


def test_masked_logits_sample_as_the_allowed_subvocabulary():
    """Structured output masks with -inf: the draw equals a draw over the allowed tokens alone (same seed),
    and never lands on a masked token; all masked falls back to argmax."""
    from tta_engine.sampling import SamplingParams, sample_token

    x = np.random.default_rng(3).standard_normal(5000).astype(np.float32) * 3
    allowed = np.sort(np.random.default_rng(4).choice(5000, 40, replace=False))
    masked = np.full_like(x, -np.inf)
    masked[allowed] = x[allowed]
    for params in (SamplingParams(temperature=0.7, top_p=0.95), SamplingParams(temperature=1.0),
                   SamplingParams(temperature=0.9, top_k=10)):
        for seed in range(50):
            got = sample_token(masked, params, np.random.default_rng(seed))
            sub = sample_token(x[allowed], params, np.random.default_rng(seed))
            assert got == allowed[sub]
    assert sample_token(np.full(8, -np.inf, dtype=np.float32), SamplingParams(temperature=1.0),
                        np.random.default_rng(0)) == 0
