"""Model configurations: TOML data files loaded into frozen, validated dataclasses.

The field names follow the design note (model_id, tokenizer_id, model_type, quantization, max_tokens,
temperature, top_p, supports_streaming, task_mapping, embedding_dimension) plus an explicit ``source``
that says where the weights come from. Every validation error names the file, the model and the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .device import parse_device
from .errors import ConfigError, UnknownModelError

MODEL_TYPES = ("causal_lm", "embedding")
QUANTIZATIONS = (None, "8bit", "4bit")
PRECISIONS = ("fp32", "fp16", "int8", "int4")
BACKENDS = ("auto", "onnx", "torch")
SOURCE_KINDS = ("hub", "local", "gguf", "package")
# The design note's quantization field maps onto the compiled artifact's precision.
_PRECISION_FOR_QUANT = {None: "fp32", "8bit": "int8", "4bit": "int4"}


def _fail(file: str, model: str, fld: str, msg: str) -> ConfigError:
    return ConfigError(f"{file}: model {model!r}, field {fld!r}: {msg}")


@dataclass(frozen=True)
class ModelSource:
    """Where the weights live. ``kind`` is one of hub, local, gguf, package.

    - hub: ``repo_id`` (+ ``revision``, ``cache_dir``); works offline when already in the cache.
    - local: ``path`` to a Transformers / sentence-transformers directory.
    - gguf: ``path`` to a .gguf file (or ``repo_id`` + ``file`` on the hub).
    - package: ``package`` (an installed Python distribution's import name) and ``file`` (a GGUF inside
      it) or ``path`` (a model directory inside it). With ``assemble`` (the name of a function of the
      package that writes ``file`` to the path it is given, e.g. a GGUF split over several wheels), the
      file is assembled once into the cache (``$TTA_ENGINE_CACHE``, default ``~/.cache/tta-engine``).
    """

    kind: str
    repo_id: str | None = None
    revision: str | None = None
    cache_dir: str | None = None
    path: str | None = None
    package: str | None = None
    file: str | None = None
    install_hint: str | None = None
    assemble: str | None = None

    def describe(self) -> str:
        if self.kind == "hub":
            rev = f"@{self.revision}" if self.revision else ""
            return f"hub:{self.repo_id}{rev}" + (f" ({self.file})" if self.file else "")
        if self.kind == "package":
            return f"package:{self.package}/{self.file or self.path or ''}"
        return f"{self.kind}:{self.path}" + (f" ({self.file})" if self.file else "")

    @property
    def is_gguf(self) -> bool:
        target = self.file or self.path or ""
        return self.kind == "gguf" or target.endswith(".gguf")


@dataclass(frozen=True)
class TaskSuitability:
    suitable: bool
    quality_score: float = 0.5
    speed_score: float = 0.5


@dataclass(frozen=True)
class ModelConfig:
    name: str
    model_type: str
    source: ModelSource
    model_id: str | None = None
    tokenizer_id: str | None = None
    quantization: str | None = None
    precision: str = "fp32"
    backend: str = "auto"
    device: str = "auto"
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.0
    supports_streaming: bool = True
    structured_output: bool = False
    context_length: int | None = None
    embedding_dimension: int | None = None
    normalize_embeddings: bool = True
    memory_bytes: int | None = None
    fallbacks: tuple[str, ...] = ()
    export_on_demand: bool = False  # export a missing artifact when the manager first loads the model
    # int4 artifacts: export and load an int8 prompt graph (about 2x faster prompts on AMX/VNNI CPUs,
    # about +170 MB on disk and in RSS for SmolLM2, lower fidelity: dynamic int8 activations); false:
    # prompts run on the decode graph (less memory, slower first token, the int4 graph's numerics)
    prefill_graph: bool = True
    # export fidelity thresholds per precision, overriding the defaults of export/gate.py:
    # {"int4": {"min_top1": 0.9, "max_kl": 0.05}} for decoders, {"int8": {"min_cosine": 0.999}} for encoders
    validation: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: MappingProxyType({}))
    task_mapping: Mapping[str, TaskSuitability] = field(default_factory=lambda: MappingProxyType({}))
    file: str = "<dict>"

    def __post_init__(self) -> None:
        f, n = self.file, self.name
        if self.model_type not in MODEL_TYPES:
            raise _fail(f, n, "model_type", f"{self.model_type!r} is not one of {MODEL_TYPES}")
        if self.quantization not in QUANTIZATIONS:
            raise _fail(f, n, "quantization", f"{self.quantization!r} is not one of none, '8bit', '4bit'")
        if self.precision not in PRECISIONS:
            raise _fail(f, n, "precision", f"{self.precision!r} is not one of {PRECISIONS}")
        if self.backend not in BACKENDS:
            raise _fail(f, n, "backend", f"{self.backend!r} is not one of {BACKENDS}")
        try:
            parse_device(self.device)
        except ConfigError as exc:
            raise _fail(f, n, "device", str(exc)) from None
        if self.max_tokens < 1:
            raise _fail(f, n, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise _fail(f, n, "temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise _fail(f, n, "top_p", f"must be in (0, 1], got {self.top_p}")
        if self.model_type == "embedding" and self.embedding_dimension is None:
            raise _fail(f, n, "embedding_dimension", "is required for model_type 'embedding'")
        if self.source.kind not in SOURCE_KINDS:
            raise _fail(f, n, "source.kind", f"{self.source.kind!r} is not one of {SOURCE_KINDS}")
        need = {"hub": ("repo_id",), "local": ("path",), "package": ("package",)}.get(self.source.kind, ())
        for attr in need:
            if not getattr(self.source, attr):
                raise _fail(f, n, f"source.{attr}", f"is required for source kind {self.source.kind!r}")
        if self.source.assemble and not (self.source.kind == "package" and self.source.file):
            raise _fail(f, n, "source.assemble", "needs source kind 'package' and the file it writes (file = ...)")
        if self.source.kind == "gguf" and not (self.source.path or (self.source.repo_id and self.source.file)):
            raise _fail(f, n, "source.path", "a gguf source needs path (or repo_id and file)")

    @property
    def is_embedding(self) -> bool:
        return self.model_type == "embedding"


# --- parsing --------------------------------------------------------------------------------------

_TYPES: dict[str, tuple[type, ...]] = {
    "model_type": (str,), "model_id": (str,), "tokenizer_id": (str,), "quantization": (str,),
    "precision": (str,), "backend": (str,), "device": (str,), "max_tokens": (int,), "temperature": (int, float),
    "top_p": (int, float), "top_k": (int,), "repetition_penalty": (int, float),
    "supports_streaming": (bool,), "structured_output": (bool,), "context_length": (int,),
    "embedding_dimension": (int,), "normalize_embeddings": (bool,), "memory_bytes": (int,),
    "fallbacks": (list, tuple), "export_on_demand": (bool,), "prefill_graph": (bool,),
    "task_mapping": (dict,), "source": (dict,), "validation": (dict,),
}
VALIDATION_KEYS = {"causal_lm": ("min_top1", "max_kl"), "embedding": ("min_cosine",)}
_REQUIRED = ("model_type", "source")
_SOURCE_FIELDS = {f.name for f in dataclasses.fields(ModelSource)}


def _check_type(file: str, model: str, key: str, value: Any, types: tuple[type, ...]) -> None:
    # bool is an int in Python: reject True where a number is wanted and 1 where a bool is wanted.
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        want = " or ".join(t.__name__ for t in types)
        raise _fail(file, model, key, f"expected {want}, got {type(value).__name__} ({value!r})")


def _parse_task_mapping(file: str, model: str, raw: dict) -> Mapping[str, TaskSuitability]:
    out: dict[str, TaskSuitability] = {}
    for task, val in raw.items():
        key = f"task_mapping.{task}"
        if isinstance(val, bool):
            out[task] = TaskSuitability(suitable=val)
        elif isinstance(val, dict):
            unknown = set(val) - {"suitable", "quality_score", "speed_score"}
            if unknown:
                raise _fail(file, model, key, f"unknown keys {sorted(unknown)}")
            if not isinstance(val.get("suitable"), bool):
                raise _fail(file, model, key + ".suitable", "is required and must be a bool")
            for s in ("quality_score", "speed_score"):
                if s in val:
                    _check_type(file, model, f"{key}.{s}", val[s], (int, float))
            out[task] = TaskSuitability(
                val["suitable"], float(val.get("quality_score", 0.5)), float(val.get("speed_score", 0.5))
            )
        else:
            raise _fail(file, model, key, f"expected a bool or a table, got {type(val).__name__}")
    return MappingProxyType(out)


def _parse_validation(file: str, model: str, model_type: str, raw: dict) -> Mapping[str, Mapping[str, float]]:
    allowed = VALIDATION_KEYS.get(model_type, ())
    out = {}
    for precision, table in raw.items():
        key = f"validation.{precision}"
        if precision not in PRECISIONS:
            raise _fail(file, model, key, f"{precision!r} is not one of {PRECISIONS}")
        if not isinstance(table, dict):
            raise _fail(file, model, key, f"expected a table of {', '.join(allowed)}, got {type(table).__name__}")
        unknown = set(table) - set(allowed)
        if unknown:
            raise _fail(file, model, f"{key}.{sorted(unknown)[0]}",
                        f"unknown threshold; a {model_type} model takes {', '.join(allowed)}")
        for name, value in table.items():
            _check_type(file, model, f"{key}.{name}", value, (int, float))
        out[precision] = MappingProxyType({k: float(v) for k, v in table.items()})
    return MappingProxyType(out)


def model_config_from_dict(name: str, raw: Mapping[str, Any], file: str = "<dict>") -> ModelConfig:
    """Build a validated :class:`ModelConfig` from one entry of a config file (or the seed's dicts)."""
    raw = dict(raw)
    unknown = set(raw) - set(_TYPES)
    if unknown:
        raise _fail(file, name, sorted(unknown)[0], f"unknown key; allowed keys are {sorted(_TYPES)}")
    if "source" not in raw and "model_id" in raw:  # the design note's dicts: model_id is a hub id
        raw["source"] = {"kind": "hub", "repo_id": raw["model_id"]}
    for key in _REQUIRED:
        if key not in raw:
            raise _fail(file, name, key, "missing required field")
    for key, value in raw.items():
        if key == "quantization" and value in (None, "none", "None"):
            raw[key] = None
            continue
        if value is None and key not in ("model_type", "source"):
            continue
        _check_type(file, name, key, value, _TYPES[key])
    src = raw.pop("source")
    bad = set(src) - _SOURCE_FIELDS
    if bad:
        raise _fail(file, name, f"source.{sorted(bad)[0]}", f"unknown key; allowed: {sorted(_SOURCE_FIELDS)}")
    if "kind" not in src:
        raise _fail(file, name, "source.kind", "missing required field")
    for k, v in src.items():
        _check_type(file, name, f"source.{k}", v, (str,))
    kwargs = {k: v for k, v in raw.items() if v is not None}
    kwargs["quantization"] = raw.get("quantization")
    if "precision" not in kwargs:
        kwargs["precision"] = _PRECISION_FOR_QUANT.get(kwargs["quantization"], "fp32")
    for k in ("temperature", "top_p", "repetition_penalty"):
        if k in kwargs:
            kwargs[k] = float(kwargs[k])
    if "fallbacks" in kwargs:
        kwargs["fallbacks"] = tuple(kwargs["fallbacks"])
    kwargs["task_mapping"] = _parse_task_mapping(file, name, raw.get("task_mapping") or {})
    kwargs["validation"] = _parse_validation(file, name, raw["model_type"], raw.get("validation") or {})
    return ModelConfig(name=name, source=ModelSource(**src), file=file, **kwargs)


def default_config_path() -> Path:
    import importlib.resources  # here, not at module level: `import tta_engine` stays fast

    return Path(str(importlib.resources.files("tta_engine.configs") / "models.toml"))


def load_model_configs(path: str | Path | None = None) -> dict[str, ModelConfig]:
    """Load every model of a TOML config file (default: the packaged ``configs/models.toml``)."""
    path = Path(path) if path is not None else default_config_path()
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    import tomllib  # here, not at module level: `import tta_engine` stays fast

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"{path}: expected a [models.NAME] table for each model, found none")
    configs = {name: model_config_from_dict(name, entry, str(path)) for name, entry in models.items()}
    for cfg in configs.values():
        for fb in cfg.fallbacks:
            if fb not in configs:
                raise _fail(str(path), cfg.name, "fallbacks", f"names unknown model {fb!r}")
    return configs


def coerce_configs(model_configs: Mapping[str, Any] | None) -> dict[str, ModelConfig]:
    """Accept ``None`` (packaged configs), ``{name: ModelConfig}`` or the design note's ``{name: dict}``."""
    if model_configs is None:
        return load_model_configs()
    out = {}
    for name, cfg in model_configs.items():
        out[name] = cfg if isinstance(cfg, ModelConfig) else model_config_from_dict(name, cfg)
    return out


def get_config(configs: Mapping[str, ModelConfig], name: str) -> ModelConfig:
    try:
        return configs[name]
    except KeyError:
        raise UnknownModelError(name, list(configs)) from None
