"""Portable artifacts: ``pack`` exported artifacts into one archive, ``install`` it elsewhere.

An archive (``.tar.gz``, or ``.tar.zst`` with the ``zstd`` extra) holds ``NAME/PRECISION/<files>`` for
each packed artifact, manifest included. Installing extracts into a private directory under the
artifacts root, refuses anything that is not a plain file or directory inside ``NAME/PRECISION/``
(absolute paths, ``..``, links, devices), checks every file against the manifest's size and sha256 and
that nothing unlisted came along, and only then publishes each artifact atomically (like export). A
tampered archive raises :class:`ArtifactCorruptedError` and publishes nothing.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from .artifact import (
    MANIFEST,
    Artifact,
    artifact_dir,
    load_artifact,
    read_manifest,
    staged_artifact,
    verify_files,
)
from .errors import ArtifactCorruptedError, ArtifactError

SUFFIXES = (".tar.gz", ".tgz", ".tar.zst")


def _kind(path: Path) -> str:
    name = path.name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return "zst" if suffix == ".tar.zst" else "gz"
    raise ArtifactError(f"{path}: unknown archive type; name it FILE.tar.gz or FILE.tar.zst")


def _zstandard():
    from .extras import require_extra

    require_extra("zstd", ".tar.zst archives")
    import zstandard

    return zstandard


@contextmanager
def _open_tar(path: Path, kind: str, mode: str) -> Iterator[tarfile.TarFile]:
    """A streaming tar reader/writer over gzip or zstd (``mode`` is "r" or "w")."""
    if kind == "gz":
        with (tarfile.open(str(path), "r|gz") if mode == "r"
              else tarfile.open(str(path), "w:gz", compresslevel=6)) as tar:
            yield tar
        return
    zstd = _zstandard()
    with open(path, "rb" if mode == "r" else "wb") as raw:
        stream = (zstd.ZstdDecompressor().stream_reader(raw) if mode == "r"
                  else zstd.ZstdCompressor(level=10, threads=-1).stream_writer(raw))
        with stream, tarfile.open(fileobj=stream, mode=f"{mode}|") as tar:
            yield tar


def pack_artifacts(root: str | Path | None, name: str, precisions: Sequence[str] | None, out: str | Path) -> Path:
    """Verify and archive ``root/NAME/PRECISION`` (every exported precision when ``precisions`` is empty)."""
    out = Path(out)
    kind = _kind(out)
    base = artifact_dir(root, name, "fp32").parent
    if not precisions:
        precisions = sorted(p.name for p in base.iterdir() if (p / MANIFEST).is_file()) if base.is_dir() else []
    if not precisions:
        raise ArtifactError(f"no artifacts of {name!r} under {base}; export it first (`tta-engine export {name}`)")
    arts = [load_artifact(artifact_dir(root, name, p)) for p in precisions]  # hashes checked before packing
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with _open_tar(tmp, kind, "w") as tar:
            for art in arts:
                for rel in [*art.manifest["files"], MANIFEST]:
                    tar.add(art.path / rel, arcname=f"{name}/{art.precision}/{rel}", recursive=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _member_target(member: tarfile.TarInfo) -> PurePosixPath | None:
    """The member's relative path, after refusing anything that could land outside an artifact."""
    rel = PurePosixPath(member.name)
    if rel.is_absolute() or ".." in rel.parts or member.name.startswith(("/", "\\")) or "\\" in member.name:
        raise ArtifactCorruptedError(f"archive member {member.name!r} points outside the artifacts root; "
                                     "refusing to install this archive")
    if member.isdir():
        return None
    if not member.isfile():
        raise ArtifactCorruptedError(f"archive member {member.name!r} is not a plain file (link or device); "
                                     "refusing to install this archive")
    if len(rel.parts) < 3:
        raise ArtifactCorruptedError(f"archive member {member.name!r} is not inside NAME/PRECISION/; "
                                     "this is not an archive made by `tta-engine pack`")
    return rel


def _check_extracted(art_dir: Path) -> None:
    manifest = read_manifest(art_dir)
    verify_files(art_dir, manifest, hashes=True)
    listed = set(manifest["files"]) | {MANIFEST}
    extra = sorted(p.relative_to(art_dir).as_posix() for p in art_dir.rglob("*")
                   if p.is_file() and p.relative_to(art_dir).as_posix() not in listed)
    if extra:
        raise ArtifactCorruptedError(f"{art_dir.name}: files not in the manifest came with the archive "
                                     f"({', '.join(extra[:5])}); refusing to install it")
    if manifest["model"]["name"] != art_dir.parent.name or manifest["precision"] != art_dir.name:
        raise ArtifactCorruptedError(f"{art_dir.parent.name}/{art_dir.name} holds the manifest of "
                                     f"{manifest['model']['name']}/{manifest['precision']}; refusing to install it")


def install_artifacts(archive: str | Path, root: str | Path | None = None) -> list[Artifact]:
    """Unpack an archive made by :func:`pack_artifacts`, verify everything, then publish each artifact."""
    archive = Path(archive)
    if not archive.is_file():
        raise ArtifactError(f"{archive} does not exist")
    kind = _kind(archive)
    root_dir = artifact_dir(root, "x", "y").parents[1]
    root_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".install-", dir=root_dir) as tmp_str:
        tmp = Path(tmp_str)
        try:
            with _open_tar(archive, kind, "r") as tar:
                for member in tar:
                    rel = _member_target(member)
                    if rel is None:
                        continue
                    dest = tmp.joinpath(*rel.parts)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    with src, open(dest, "wb") as f:
                        shutil.copyfileobj(src, f)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ArtifactCorruptedError(f"{archive} is not a readable archive ({type(exc).__name__}: {exc}); "
                                         "pack it again") from exc
        found = sorted(p.parent for p in tmp.glob(f"*/*/{MANIFEST}"))
        if not found:
            raise ArtifactCorruptedError(f"{archive} holds no NAME/PRECISION/{MANIFEST}; not an artifact archive")
        for art_dir in found:  # everything verified before anything is published
            _check_extracted(art_dir)
        for art_dir in found:
            final = artifact_dir(root, art_dir.parent.name, art_dir.name)
            with staged_artifact(final) as staged:
                for item in art_dir.iterdir():
                    os.replace(item, staged / item.name)
        return [load_artifact(artifact_dir(root, d.parent.name, d.name), verify=False) for d in found]
