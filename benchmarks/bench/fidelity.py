"""Fidelity against the fp32 PyTorch model: top-1 agreement, KL divergence and greedy agreement."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .engines import LMEngine, TtaLM


def fidelity_from_logits(refs: Sequence[Any], got: Sequence[Any]) -> dict[str, float]:
    """Top-1 agreement and mean KL(p_ref || p_got) over teacher-forced logits [seq, vocab] per prompt."""
    import numpy as np
    from tta_engine.export.validate import top1_and_kl  # the export's own figures, one implementation

    agree, kls = [], []
    for r, g in zip(refs, got, strict=True):
        top1, kl = top1_and_kl(np.asarray(r, dtype=np.float64), np.asarray(g, dtype=np.float64))
        agree.extend(top1)
        kls.extend(kl)
    return {"top1_agreement": round(float(np.mean(agree)), 6),
            "mean_kl_divergence": float(f"{float(np.mean(kls)):.6g}"), "positions": len(agree)}


def common_prefix_fraction(a: Sequence[int], b: Sequence[int]) -> float:
    n = min(len(a), len(b))
    if n == 0:
        return 0.0
    k = next((i for i in range(n) if a[i] != b[i]), n)
    return k / n


def lm_fidelity(engines: Sequence[LMEngine], hf_dir: str | None, tokenizer, greedy_steps: int, *,
                reference=None, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Per engine, vs the fp32 PyTorch model on export/validate.py's prompts: top-1 agreement and mean KL
    (teacher-forced); tta engines also greedy agreement over ``greedy_steps`` tokens."""
    from tta_engine.export import validate

    if reference is None:
        if hf_dir is None:
            return {}
        import torch
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = validate.validation_prompts(tokenizer)
    refs = validate.torch_reference(reference, prompts, greedy_steps)
    out = {}
    for e in engines:
        try:
            if isinstance(e, TtaLM):
                fig = validate.compare_decoder(refs, e.lm.backend, prompts, greedy_steps)
                fig = {k: fig[k] for k in ("top1_agreement", "mean_kl_divergence", "greedy_agreement", "positions")}
            else:
                got = [e.teacher_forced_logits(p) for p in prompts]
                if any(g is None for g in got):
                    continue
                fig = fidelity_from_logits([r["logits"] for r in refs], got)
            out[e.key] = fig
            log(f"  fidelity {e.key:18} top-1 {fig['top1_agreement']:.4f}  KL {fig['mean_kl_divergence']:.3g}")
        except Exception as exc:  # noqa: BLE001
            log(f"  fidelity {e.key}: {type(exc).__name__}: {exc}")
    return out
