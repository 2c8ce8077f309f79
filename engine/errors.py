"""Typed exceptions of tta-engine. Each message says what went wrong and what to do about it."""

from __future__ import annotations


class TTAEngineError(Exception):
    """Base class of every error raised on purpose by tta-engine."""


class ConfigError(TTAEngineError, ValueError):
    """A model configuration file or entry is invalid (names the file, model and field)."""


class UnknownModelError(TTAEngineError, KeyError):
    """A model name that no configuration defines."""

    def __init__(self, name: str, known: list[str] | tuple[str, ...]):
        self.name = name
        self.known = list(known)
        super().__init__(
            f"unknown model {name!r}; configured models are: {', '.join(sorted(self.known)) or '(none)'}. "
            "Add it to a config file (see configs/models.toml) or use one of these names."
        )

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class ModelNotAvailableError(TTAEngineError):
    """The model's weights cannot be found locally (and the hub cannot be reached)."""


class ArtifactError(TTAEngineError):
    """A compiled artifact is missing, incomplete or was produced for something else."""


class ArtifactMissingError(ArtifactError):
    """No artifact was exported at the path; the message names the command that makes it."""


class ArtifactCorruptedError(ArtifactError):
    """An artifact is damaged: a file changed, truncated or missing, or its manifest missing or unreadable."""


class ExportError(TTAEngineError):
    """The export stage failed (including failed validation against PyTorch)."""


class LowFidelityError(ExportError):
    """An export's validation figures fall below the thresholds of its model kind and precision: nothing
    was published. ``failures`` lists what failed (figure, value, threshold) per precision."""

    def __init__(self, message: str, failures: dict | None = None):
        super().__init__(message)
        self.failures = failures or {}


class ContextLengthError(TTAEngineError, ValueError):
    """The prompt (plus the requested new tokens) does not fit the model's context."""


def context_exceeded(tokens: int, context: int) -> ContextLengthError:
    """The error a backend raises when a step would hold more tokens than the model's context."""
    return ContextLengthError(
        f"{tokens} tokens exceed the context of {context} tokens; shorten the prompt or lower max_new_tokens."
    )


class SamplingParamError(TTAEngineError, ValueError):
    """A generation parameter has an invalid value."""


class InvalidInputError(TTAEngineError, ValueError):
    """A prompt, message list or text batch of the wrong type or with invalid content (engine/inputs.py)."""


class EmptyInputError(InvalidInputError):
    """An empty message list or empty text batch where at least one item is required."""


class ChatTemplateError(InvalidInputError):
    """The model's chat template does not compile or rejects the messages (e.g. roles out of order)."""


class ModelTypeError(TTAEngineError, ValueError):
    """A model asked for a job of the other kind: an embedding model asked to generate, or an LM to embed."""

    def __init__(self, name: str, model_type: str, wanted: str):
        self.name, self.model_type, self.wanted = name, model_type, wanted
        use = "generate / chat / astream" if model_type == "causal_lm" else "embed / get_embeddings"
        super().__init__(f"model {name!r} is a {model_type} model, not a {wanted} model: use it with {use}, "
                         f"or pick a model whose model_type is {wanted!r}")


class OverloadedError(TTAEngineError):
    """The request queue of a model is full; retry later or raise the queue size."""


class ModelUnloadedError(OverloadedError):
    """The model was unloaded (evicted, closed) while the request waited or ran; the request produced no
    complete answer. Retry it: the next request loads the model again."""


class NoCapableModelError(TTAEngineError, LookupError):
    """No configured model can serve a task under the given constraints."""


class BackendUnavailableError(TTAEngineError, ImportError):
    """An optional dependency needed for this path is not installed."""


class StructuredOutputError(TTAEngineError, ValueError):
    """A ``response_format`` that does not compile, or output that did not complete / validate.

    ``raw_text`` holds the generated text when there was some (e.g. max_tokens hit before the grammar was
    complete); ``finish_reason`` the request's finish reason when known.
    """

    def __init__(self, message: str, *, raw_text: str = "", finish_reason: str | None = None):
        super().__init__(message)
        self.raw_text = raw_text
        self.finish_reason = finish_reason
