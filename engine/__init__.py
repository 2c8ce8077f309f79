"""tta-engine: a compiled local inference engine for small language models and sentence embeddings."""

from .config import ModelConfig, ModelSource, TaskSuitability, load_model_configs
from .errors import (
    ArtifactCorruptedError,
    ArtifactError,
    BackendUnavailableError,
    ChatTemplateError,
    ConfigError,
    ContextLengthError,
    EmptyInputError,
    ExportError,
    ModelNotAvailableError,
    NoCapableModelError,
    OverloadedError,
    SamplingParamError,
    TTAEngineError,
    UnknownModelError,
)

__version__ = "0.1.0"

__all__ = [
    "ArtifactCorruptedError", "ArtifactError", "BackendUnavailableError", "ChatTemplateError", "ConfigError",
    "ContextLengthError", "EmptyInputError", "ExportError", "ModelConfig", "ModelNotAvailableError",
    "ModelSource", "NoCapableModelError", "OverloadedError", "SamplingParamError", "TTAEngineError",
    "TaskSuitability", "UnknownModelError", "load_model_configs",
]
