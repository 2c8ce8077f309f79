"""Resolve a model's source (hub, local directory, GGUF file, installed package) and load it in PyTorch.

Hub sources keep the real loading code (repo id, revision, cache_dir). Offline, a model that is not in
the local cache fails with :class:`ModelNotAvailableError` saying how to provide it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig
from .device import CPU, Device
from .errors import ModelNotAvailableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedSource:
    """A local directory holding the model, plus the GGUF file name inside it when the source is GGUF."""

    directory: Path
    gguf_file: str | None = None

    @property
    def files(self) -> list[Path]:
        """The input files whose hashes identify the source."""
        if self.gguf_file:
            return [self.directory / self.gguf_file]
        keep = (".json", ".safetensors", ".bin", ".txt", ".model", ".jinja")
        return sorted(p for p in self.directory.rglob("*") if p.is_file() and p.suffix in keep)


def _hint(cfg: ModelConfig) -> str:
    if cfg.source.install_hint:
        return f"Install it with `{cfg.source.install_hint}`."
    if cfg.source.kind == "hub":
        return (
            f"Download it once with network access (`huggingface-cli download {cfg.source.repo_id}`), "
            "or point the config's source at a local directory (source = {kind = \"local\", path = ...})."
        )
    return "Fix the path in the model's config."


def _resolve_hub(cfg: ModelConfig, cache_dir: str | None) -> ResolvedSource:
    from huggingface_hub import hf_hub_download, snapshot_download

    src = cfg.source
    cache = src.cache_dir or cache_dir
    kwargs = dict(repo_id=src.repo_id, revision=src.revision, cache_dir=cache)
    last_exc: Exception | None = None
    # First the local cache (instant, offline); then the hub unless offline mode is set.
    modes = [True] if os.environ.get("HF_HUB_OFFLINE") == "1" else [True, False]
    for local_only in modes:
        try:
            if src.file:
                path = Path(hf_hub_download(filename=src.file, local_files_only=local_only, **kwargs))
                return ResolvedSource(path.parent, src.file)
            return ResolvedSource(Path(snapshot_download(local_files_only=local_only, **kwargs)))
        except Exception as exc:  # noqa: BLE001 - hub raises many types (offline, 404, connection)
            last_exc = exc
    raise ModelNotAvailableError(
        f"model {cfg.name!r} ({src.describe()}) is not available locally and could not be downloaded "
        f"({type(last_exc).__name__}). {_hint(cfg)}"
    ) from last_exc


def cache_root() -> Path:
    """Where files made from installed packages go: ``$TTA_ENGINE_CACHE``, default ~/.cache/tta-engine."""
    return Path(os.environ.get("TTA_ENGINE_CACHE") or Path.home() / ".cache" / "tta-engine")


def _assembled(cfg: ModelConfig) -> Path:
    """Call the package's ``assemble(path)`` once (it verifies its own checksum on later calls) and
    return the file; the file is written under a temporary name and renamed, so a crash leaves none."""
    import importlib.metadata

    src = cfg.source
    module = importlib.import_module(src.package)
    build = getattr(module, src.assemble, None)
    if not callable(build):
        raise ModelNotAvailableError(f"model {cfg.name!r}: package {src.package!r} has no function "
                                     f"{src.assemble!r} to assemble {src.file}. {_hint(cfg)}")
    dist = importlib.metadata.packages_distributions().get(src.package, [src.package])[0]
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    target = cache_root() / f"{src.package}-{version}" / src.file
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("assembling %s from package %s into %s", src.file, src.package, target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        build(tmp)
        os.replace(tmp, target)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise ModelNotAvailableError(f"model {cfg.name!r}: assembling {src.file} from {src.package!r} failed "
                                     f"({type(exc).__name__}: {exc}). {_hint(cfg)}") from exc
    return target


def resolve_source(cfg: ModelConfig, cache_dir: str | None = None) -> ResolvedSource:
    src = cfg.source
    if src.kind == "hub":
        return _resolve_hub(cfg, cache_dir)
    if src.kind == "package":
        spec = importlib.util.find_spec(src.package)  # does not import (some packages need extra deps)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotAvailableError(
                f"model {cfg.name!r} needs the Python package {src.package!r}, which is not installed. "
                + _hint(cfg)
            )
        if src.assemble:
            path = _assembled(cfg)
            return ResolvedSource(path.parent, path.name)
        base = Path(next(iter(spec.submodule_search_locations)))
        target = base / (src.file or src.path or "")
    elif src.kind == "gguf" and src.repo_id:
        return _resolve_hub(cfg, cache_dir)
    else:
        target = Path(src.path).expanduser()
        if src.file:
            target = target / src.file
    if not target.exists():
        raise ModelNotAvailableError(f"model {cfg.name!r}: {target} does not exist. {_hint(cfg)}")
    if target.is_file():
        return ResolvedSource(target.parent, target.name)
    return ResolvedSource(target)


_GGUF_LOCK = threading.RLock()


@contextmanager
def gguf_parsed_once():
    """Within the block, every ``gguf.GGUFReader(path)`` of one path returns the same reader.

    Transformers parses a GGUF file's header again for the config, the tokenizer and the weights
    (``load_gguf_checkpoint`` -> ``gguf.GGUFReader``), and the header of a 262k-token vocabulary is 262k
    strings read one by one: about 10 s per parse. The reader is read-only (a memmap), so one parse serves
    every caller. ``load_tokenizer`` and ``load_torch_causal_lm`` each run in a block; a caller's block
    around both shares one parse between them (a nested block reuses the outer one's readers). Serialized
    by a lock: the patched name is module-global."""
    try:
        import gguf
    except ImportError:  # no GGUF support installed: nothing to share
        yield
        return
    with _GGUF_LOCK:
        if getattr(gguf.GGUFReader, "_tta_shared", False):  # inside an outer block: its readers serve
            yield
            return
        real, readers = gguf.GGUFReader, {}

        def shared(path, mode="r"):
            key = (os.path.realpath(os.fspath(path)), mode)
            if key not in readers:
                readers[key] = real(path, mode)
            return readers[key]

        shared._tta_shared = True
        gguf.GGUFReader = shared
        try:
            yield
        finally:
            gguf.GGUFReader = real


def load_tokenizer(cfg: ModelConfig, resolved: ResolvedSource):
    from transformers import AutoTokenizer

    if resolved.gguf_file:
        with gguf_parsed_once():  # its config and its vocabulary: one parse
            return AutoTokenizer.from_pretrained(resolved.directory, gguf_file=resolved.gguf_file)
    return AutoTokenizer.from_pretrained(resolved.directory)


def torch_dtype_for(device: Device):
    """fp32 on the CPU; on a GPU bf16 where it is supported (Ampere and later: fp32's range, so no
    overflow in models such as Gemma), else fp16."""
    import torch

    if not device.is_cuda:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_torch_causal_lm(cfg: ModelConfig, resolved: ResolvedSource, *, quantization: str | None = None,
                         device: Device = CPU):
    """Load the PyTorch model on ``device``: fp32 on the CPU, bf16/fp16 weights on a GPU, bitsandbytes
    8-bit or 4-bit nf4 (placed on the device by bitsandbytes) when ``quantization`` asks for it."""
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype_for(device)
    kwargs: dict = {"dtype": dtype}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file  # Transformers dequantizes GGUF into fp32 weights
    if quantization in ("8bit", "4bit") and resolved.gguf_file:
        # Transformers refuses bitsandbytes on a GGUF file ("cannot combine Quantization and loading a model
        # from a GGUF file"): the GGUF's own quantization was dequantized above, so run it unquantized.
        log.warning("%s: bitsandbytes %s quantization is not available for GGUF sources in Transformers; the "
                    "PyTorch fallback runs the dequantized weights (export it: `tta-engine export %s`)",
                    cfg.name, quantization, cfg.name)
        quantization = None
    if quantization in ("8bit", "4bit"):
        kwargs["quantization_config"] = bitsandbytes_config(quantization, compute_dtype=dtype)
        if device.is_cuda:
            kwargs["device_map"] = {"": device.index}
    # on a GPU, PyTorch's fused attention kernels (sdpa); on the CPU eager, as validated at export
    attn = "sdpa" if device.is_cuda else "eager"
    with gguf_parsed_once():  # a GGUF's config and weights: one parse
        model = AutoModelForCausalLM.from_pretrained(resolved.directory, attn_implementation=attn, **kwargs)
    if "device_map" not in kwargs and device.is_cuda:
        model = model.to(device.torch_name)
    return model.eval()


END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|end|>", "<|eot_id|>", "<|endoftext|>")


def eos_token_ids(model, tokenizer) -> list[int]:
    """EOS ids from the generation config, the tokenizer, and the chat template's end-of-turn tokens."""
    ids: set[int] = set()
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(int(i) for i in ids)


def bitsandbytes_config(quantization: str, compute_dtype=None):
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        from .errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"quantization={quantization!r} on the PyTorch path needs bitsandbytes: "
            "`pip install 'tta-engine[quant]'` (or use the ONNX artifact, which is quantized at export)."
        ) from exc
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
