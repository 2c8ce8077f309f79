"""Stage 5: numeric validation of an exported graph against the PyTorch source model.

Decoders: on fixed prompts, teacher-forced along the runtime's path (half the prompt in one forward, on
the int4 artifact's prompt graph where it has one, then one token at a time through the KV cache):
max |Δlogit|, top-1 agreement and mean KL(p_torch || p_onnx); then greedy decoding for 32 steps from
each prompt in both, reporting the fraction of tokens equal before the first divergence.
Encoders: cosine similarity with sentence-transformers on a fixed text set.
"""

from __future__ import annotations

import numpy as np

VALIDATION_MESSAGES = [
    [{"role": "user", "content": "Describe a quiet forest clearing at dawn in two sentences."}],
    [{"role": "system", "content": "You are the narrator of a calm text adventure."},
     {"role": "user", "content": "I open the old wooden door. What do I see?"}],
    [{"role": "user", "content": "Give me one slow breathing exercise for a stressful moment."}],
]
VALIDATION_TEXTS = [
    "The lantern flickers as you step into the quiet forest.",
    "Breathe in for four counts, hold, and breathe out slowly.",
    "A wise mentor offers you a cup of warm tea by the fire.",
    "I'm feeling anxious about my upcoming presentation.",
    "The river sings over smooth stones under a silver moon.",
    "Short.",
    "A much longer sentence that rambles on about mountains, rivers, old castles, forgotten songs and the "
    "gentle weight of evening light on a traveller who has walked for many days without rest.",
]


def validation_prompts(tokenizer, limit: int = 96) -> list[list[int]]:
    """The validation messages through the model's chat template (the runtime's rendering)."""
    from tta_engine.tokenizer import as_tokenizer

    tok = as_tokenizer(tokenizer)
    return [list(tok.apply_chat_template(msgs, add_generation_prompt=True))[:limit] for msgs in VALIDATION_MESSAGES]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def top1_and_kl(ref: np.ndarray, got: np.ndarray) -> tuple[list[bool], list[float]]:
    """Per position of teacher-forced logits [seq, vocab]: top-1 agreement and KL(p_ref || p_got)."""
    lp, lq = _log_softmax(ref), _log_softmax(got)
    return (ref.argmax(-1) == got.argmax(-1)).tolist(), (np.exp(lp) * (lp - lq)).sum(-1).tolist()


def torch_reference(model, prompts: list[list[int]], greedy_steps: int) -> list[dict]:
    """Per prompt: teacher-forced logits [seq, vocab] and ``greedy_steps`` greedy tokens (EOS not special)."""
    import torch

    refs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model(x, use_cache=True)
            logits = out.logits[0].float().numpy()
            past, tokens = out.past_key_values, []
            nxt = int(logits[-1].argmax())
            for _ in range(greedy_steps):
                tokens.append(nxt)
                out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = int(out.logits[0, -1].argmax())
            refs.append({"logits": logits, "greedy": tokens})
    return refs


def onnx_run(decoder, ids: list[int], greedy_steps: int) -> tuple[np.ndarray, list[int]]:
    """Teacher-forced logits [seq, vocab] along the runtime's own path: the first half of the prompt in
    one forward (on the prompt graph where the artifact has one: its last position's logits and the KV
    it writes count), the rest one token at a time through the KV cache on top of it; the positions
    before the prompt's half, one token at a time from an empty cache. Then greedy tokens the way the
    runtime produces them: the whole prompt at once, then decode steps."""
    half = max(2, len(ids) // 2) if len(ids) >= 2 else len(ids)
    cache = decoder.new_cache(1, capacity=len(ids) + greedy_steps + 1)
    rows = [decoder.forward(cache, np.array([[t]]))[0] for t in ids[:half - 1]]
    cache = decoder.new_cache(1, capacity=len(ids) + greedy_steps + 1)
    rows.append(decoder.forward(cache, np.array([ids[:half]]))[0])
    rows += [decoder.forward(cache, np.array([[t]]))[0] for t in ids[half:]]
    cache = decoder.new_cache(1, capacity=len(ids) + greedy_steps + 1)
    nxt = int(decoder.forward(cache, np.array([ids]))[0].argmax())
    tokens = []
    for _ in range(greedy_steps):
        tokens.append(nxt)
        nxt = int(decoder.forward(cache, np.array([[nxt]]))[0].argmax())
    return np.stack(rows), tokens


def compare_decoder(refs: list[dict], decoder, prompts: list[list[int]], greedy_steps: int) -> dict:
    max_diff, agree, kls, greedy_match, exact = 0.0, [], [], [], True
    for ref, ids in zip(refs, prompts, strict=True):
        logits, tokens = onnx_run(decoder, ids, greedy_steps)
        max_diff = max(max_diff, float(np.abs(logits - ref["logits"]).max()))
        top1, kl = top1_and_kl(ref["logits"], logits)
        agree.extend(top1)
        kls.extend(kl)
        prefix = next((i for i, (a, b) in enumerate(zip(tokens, ref["greedy"], strict=True)) if a != b), greedy_steps)
        greedy_match.append(prefix / greedy_steps)
        exact &= tokens == ref["greedy"]
    return {
        "max_abs_logit_diff": round(max_diff, 6),
        "top1_agreement": round(float(np.mean(agree)), 6),
        "mean_kl_divergence": float(f"{float(np.mean(kls)):.6g}"),
        "greedy_agreement": round(float(np.mean(greedy_match)), 6),
        "greedy_exact": bool(exact),
        "greedy_steps": greedy_steps,
        "positions": len(agree),
        "prompts": len(prompts),
    }


def compare_encoder(st_model, encoder, texts: list[str] = VALIDATION_TEXTS) -> dict:
    ref = st_model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    got = encoder.encode(texts, normalize=True)
    cos = (ref * got).sum(axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    return {"min_cosine": round(float(cos.min()), 7), "mean_cosine": round(float(cos.mean()), 7),
            "texts": len(texts)}
