"""Compiled artifacts on disk: layout, manifest, hashing, verification and atomic publication.

The export stage writes an artifact directory and its ``manifest.json``; the runtime reads only that.
An artifact is published atomically: it is assembled in a temporary sibling directory and renamed into
place, so a failed or interrupted export never leaves a half-written artifact or loses the old one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ArtifactCorruptedError, ArtifactError, ArtifactMissingError

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: self-contained (tokenizer.json, chat template, special tokens in the manifest)


def default_artifacts_dir() -> Path:
    return Path(os.environ.get("TTA_ENGINE_ARTIFACTS", "artifacts"))


def artifact_dir(root: str | Path | None, name: str, precision: str) -> Path:
    return Path(root if root is not None else default_artifacts_dir()) / name / precision


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_files(root: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``root`` except the manifest: relative path -> {size, sha256}."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return out


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def size_bytes(self) -> int:
        return sum(f["size"] for f in self.manifest["files"].values())

    def file(self, rel: str) -> Path:
        return self.path / rel


def export_command(path: Path) -> str:
    return f"tta-engine export {path.parent.name} --precision {path.name}"


def artifact_present(path: Path) -> bool:
    """Whether anything (a directory, a link, even a dangling one) is published at ``path``."""
    return path.is_symlink() or path.exists()


def read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not mpath.is_file():
        if not artifact_present(path):
            raise ArtifactMissingError(f"no artifact at {path}. Create it with `{export_command(path)}`.")
        raise ArtifactCorruptedError(
            f"the artifact at {path} is incomplete: {MANIFEST} is missing. Re-create it with `{export_command(path)}`."
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactCorruptedError(f"{mpath} is not valid JSON ({exc}); re-export: `{export_command(path)}`.") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ArtifactCorruptedError(f"{mpath} has no file list; re-export: `{export_command(path)}`.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath} has format_version {manifest.get('format_version')!r}, this engine reads "
            f"{FORMAT_VERSION}; re-export the model with this version of tta-engine."
        )
    return manifest


def verify_files(path: Path, manifest: dict[str, Any], *, hashes: bool = True) -> None:
    """Check every file listed in the manifest exists with the recorded size (and sha256)."""
    for rel, meta in manifest["files"].items():
        p = path / rel
        if not p.is_file():
            raise ArtifactCorruptedError(f"{p} is listed in the manifest but missing; re-export: `{export_command(path)}`.")
        if p.stat().st_size != meta["size"]:
            raise ArtifactCorruptedError(
                f"{p} has {p.stat().st_size} bytes, the manifest records {meta['size']}; "
                f"the file was changed or truncated. Re-export: `{export_command(path)}`."
            )
        if hashes and sha256_file(p) != meta["sha256"]:
            raise ArtifactCorruptedError(
                f"{p} does not match the sha256 in its manifest (tampered or corrupted); re-export: "
                f"`{export_command(path)}`."
            )


# Artifacts whose files were hashed in this process, with the (size, mtime, inode) of each file then:
# a reload (after an LRU eviction, say) re-hashes only when a file changed on disk. The same signature is
# kept beside the files (VERIFIED_STAMP, best effort: a read-only folder just has none), so a new process
# does not hash again either: hashing SmolLM2's 319 MB int4 artifact took 0.24 s of a 1.0 s cold start.
# A file changed in place gets a new mtime (and is hashed again); `tta-engine verify` always hashes.
VERIFIED_STAMP = ".verified.json"
_verified: dict[str, tuple] = {}
_verified_lock = threading.Lock()


def _file_signature(path: Path, manifest: dict[str, Any]) -> tuple:
    sig = []
    for rel in sorted(manifest["files"]):
        st = (path / rel).stat()
        sig.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
    st = (path / MANIFEST).stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_ino, tuple(sig))


def _as_json(sig: tuple) -> list:
    return json.loads(json.dumps(sig))  # tuples -> lists, as the stamp reads back


def _stamped(path: Path, sig: tuple) -> bool:
    try:
        return json.loads((path / VERIFIED_STAMP).read_text()) == _as_json(sig)
    except (OSError, ValueError):
        return False


def _write_stamp(path: Path, sig: tuple) -> None:
    tmp = path / f"{VERIFIED_STAMP}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(sig))
        os.replace(tmp, path / VERIFIED_STAMP)
    except OSError:  # read-only artifacts: verified once per process instead
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def load_artifact(path: str | Path, *, verify: bool = True, rehash: bool = False) -> Artifact:
    """Read and check an artifact. ``verify`` hashes its files against the manifest once per file state
    (size, mtime, inode), remembered in this process and in a stamp beside the files; ``rehash`` hashes
    them again regardless (``tta-engine verify``)."""
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest, hashes=False)
    if verify or rehash:
        key = str(path.resolve())
        sig = _file_signature(path, manifest)
        with _verified_lock:
            known = _verified.get(key) == sig
        if not (known or rehash) and _stamped(path, sig):
            known = True
        if rehash or not known:
            try:
                verify_files(path, manifest, hashes=True)
            except ArtifactCorruptedError:
                with contextlib.suppress(OSError):
                    (path / VERIFIED_STAMP).unlink(missing_ok=True)
                raise
            _write_stamp(path, sig)
        with _verified_lock:
            _verified[key] = sig
    return Artifact(path, manifest)


def write_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = dict(manifest, format_version=FORMAT_VERSION, files=list_files(path))
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


@contextmanager
def staged_artifact(final: Path) -> Iterator[Path]:
    """Yield a fresh directory next to ``final``; on success, publish it atomically.

    ``final`` is a symbolic link to a versioned sibling directory; publishing renames a new link over
    it, which is atomic on POSIX. On any exception (KeyboardInterrupt included) the staged directory is
    removed and an existing artifact at ``final`` stays exactly as it was.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield staged
        if not (staged / MANIFEST).is_file():
            raise ArtifactError(f"internal error: staged artifact {staged} has no manifest")
        _publish(staged, final)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _publish(staged: Path, final: Path) -> None:
    previous = final.resolve() if final.is_symlink() else None
    link_tmp = final.with_name(f".{final.name}.link-{os.getpid()}")
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    try:
        os.symlink(staged.name, link_tmp, target_is_directory=True)
    except OSError:  # no symlinks (some Windows setups): fall back to rename, small unsafe window
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)
        return
    if final.exists() and not final.is_symlink():  # a plain directory from an older layout
        shutil.rmtree(final)
    os.replace(link_tmp, final)
    if previous is not None and previous != staged.resolve():
        shutil.rmtree(previous, ignore_errors=True)


# --- staging left behind by dead exports ---------------------------------------------------------------

_STAGING = re.compile(r"^\.(work-.+|(fp32|int8|int4)-.+|(fp32|int8|int4)\.link-\d+)$")


@contextmanager
def export_lock(model_root: Path) -> Iterator[None]:
    """Hold the export lock of one model's artifacts directory (``<root>/<name>``): one export at a time
    per model, and a lock the kernel releases when its process dies (SIGKILL included)."""
    model_root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, and no cleanup of other exports' staging either
        yield
        return
    with open(model_root / ".export.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_stale_staging(model_root: Path) -> list[str]:
    """Remove the work and staged directories (and temporary links) of exports that died before
    publishing. Call it holding ``export_lock(model_root)``: then no live export owns any of them.
    Directories that a published link points at are kept. Returns the names removed."""
    if not model_root.is_dir():
        return []
    published = {os.readlink(p) for p in model_root.iterdir() if p.is_symlink() and not _STAGING.match(p.name)}
    removed = []
    for p in model_root.iterdir():
        if not _STAGING.match(p.name) or p.name in published:
            continue
        if p.is_symlink() or p.is_file():
            p.unlink(missing_ok=True)
        else:
            shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return sorted(removed)
