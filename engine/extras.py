"""Optional dependency groups (pyproject extras) and the typed error when one is missing."""

from __future__ import annotations

import importlib.util

from .errors import BackendUnavailableError

EXTRAS: dict[str, tuple[str, ...]] = {
    "export": ("torch", "transformers", "onnx", "optimum", "sentence_transformers", "gguf"),
    "torch": ("torch", "transformers"),
    "zstd": ("zstandard",),
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a blocked or broken module counts as missing
        return False


def require_extra(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise :class:`BackendUnavailableError` with the install command when a module of ``extra`` is missing."""
    missing = [m for m in (modules or EXTRAS[extra]) if not _importable(m)]
    if missing:
        raise BackendUnavailableError(
            f"{what} needs the optional dependencies of tta-engine[{extra}] ({', '.join(missing)} not "
            f"installed): `pip install 'tta-engine[{extra}]'`"
        )
