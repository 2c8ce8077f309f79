"""Tiny random models and a tiny byte-level BPE tokenizer, built in-process (no downloads).

Every supported architecture has a factory here; tests build, save and export these in seconds.
The tokenizer is byte-level, so an emoji or a CJK character is several tokens: the UTF-8 streaming
tests rely on that.
"""

from __future__ import annotations

from pathlib import Path

VOCAB_SIZE = 384
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The lantern flickers as you step into the quiet forest.",
    "You feel calm. Breathe in slowly, and breathe out.",
    "A wise mentor smiles and offers you a cup of tea.",
    "The river sings over smooth stones under the moon.",
    "Hello! How can I help you today? 你好，世界。 😀 🌲 ✨",
] * 20


def tiny_tokenizer():
    """A ChatML byte-level BPE tokenizer (PreTrainedTokenizerFast) with VOCAB_SIZE entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _common(vocab: int) -> dict:
    return dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def tiny_config(arch: str, vocab: int = VOCAB_SIZE):
    from transformers import BertConfig, Gemma3TextConfig, LlamaConfig, Phi3Config, Qwen2Config

    c = _common(vocab)
    if arch == "llama":
        return LlamaConfig(**c, rope_theta=10000.0, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**c, rope_theta=10000.0, tie_word_embeddings=False, use_sliding_window=False)
    if arch == "phi3":
        # phi-4-mini uses a partial rotary factor of 0.75 and tied embeddings.
        return Phi3Config(**c, rope_theta=10000.0, partial_rotary_factor=0.75, tie_word_embeddings=True,
                          original_max_position_embeddings=256)
    if arch == "gemma3":
        return Gemma3TextConfig(**c, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                                layer_types=["sliding_attention", "full_attention"])
    if arch == "bert":
        return BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, max_position_embeddings=128)
    raise ValueError(f"unknown tiny architecture {arch!r}")


DECODER_ARCHS = ("llama", "qwen2", "phi3", "gemma3")


def tiny_model(arch: str, seed: int = 0):
    """A random tiny model in eval mode; weights are scaled up a little so logits are not all ~0."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    if arch == "bert":
        model = AutoModel.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model.eval()


def save_tiny_decoder(arch: str, out: Path, seed: int = 0) -> Path:
    """Save a tiny causal LM with the tiny tokenizer (chat template included) as a HF directory."""
    model = tiny_model(arch, seed)
    model.generation_config.eos_token_id = [2]
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def save_tiny_encoder(out: Path, seed: int = 0) -> Path:
    """Save a tiny BERT as a sentence-transformers directory (mean pooling + normalize)."""
    from sentence_transformers import SentenceTransformer, models

    model = tiny_model("bert", seed)
    hf_dir = out / "_hf"
    model.save_pretrained(hf_dir)
    tok = tiny_tokenizer()
    tok.chat_template = None  # sentence-transformers >= 5 would render texts through a chat template
    tok.save_pretrained(hf_dir)
    word = models.Transformer(str(hf_dir), max_seq_length=128)
    pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
    st = SentenceTransformer(modules=[word, pool, models.Normalize()], device="cpu")
    st.save(str(out))
    return out
