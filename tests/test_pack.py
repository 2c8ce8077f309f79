"""Portable artifacts: pack on one machine, install-artifact on another (hashes verified, atomic)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
from tta_engine.artifact import load_artifact
from tta_engine.cli import main
from tta_engine.errors import ArtifactCorruptedError
from tta_engine.pack import install_artifacts, pack_artifacts
from tta_engine.runtime import open_artifact_lm

MSGS = [{"role": "user", "content": "Hello there"}]


def _exported_root(artifacts) -> Path:
    art = artifacts.get("tiny-llama", "int4")
    artifacts.get("tiny-llama", "fp32")
    return art.path.parents[1]


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar.zst"])
def test_pack_install_round_trip_generates_the_same_tokens(artifacts, tmp_path, suffix):
    if suffix == ".tar.zst":
        pytest.importorskip("zstandard", reason="the zstd extra (installed by make test)")
    root = _exported_root(artifacts)
    archive = tmp_path / f"tiny-llama{suffix}"
    assert main(["pack", "tiny-llama", "--artifacts", str(root), "-o", str(archive)]) == 0
    dest = tmp_path / "game-artifacts"
    assert main(["install-artifact", str(archive), "--artifacts", str(dest)]) == 0
    for precision in ("fp32", "int4"):
        src, got = load_artifact(root / "tiny-llama" / precision), load_artifact(dest / "tiny-llama" / precision)
        assert got.manifest == src.manifest
        a, b = open_artifact_lm(src), open_artifact_lm(got)
        assert a.generate(MSGS, temperature=0, max_new_tokens=8)["token_ids"] == \
            b.generate(MSGS, temperature=0, max_new_tokens=8)["token_ids"]
    assert not [p for p in dest.rglob(".install-*")]


def _rewrite(archive: Path, out: Path, change) -> Path:
    """Copy a .tar.gz archive member by member, letting ``change(info, data)`` alter or add members."""
    with tarfile.open(archive, "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read() if info.isfile() else None
            for new_info, new_data in change(info, data):
                dst.addfile(new_info, io.BytesIO(new_data) if new_data is not None else None)
    return out


def _flip_onnx_byte(info, data):
    if info.name.endswith("model.onnx"):
        data = bytearray(data)
        data[len(data) // 2] ^= 0xFF
        data = bytes(data)
    yield info, data


def _traversal(info, data):
    yield info, data
    if info.name.endswith("manifest.json"):
        evil = tarfile.TarInfo("../../evil.txt")
        evil.size = 4
        yield evil, b"evil"


def _symlink(info, data):
    yield info, data
    if info.name.endswith("manifest.json"):
        link = tarfile.TarInfo("tiny-llama/fp32/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        yield link, None


def _unlisted(info, data):
    yield info, data
    if info.name.endswith("manifest.json"):
        extra = tarfile.TarInfo("tiny-llama/fp32/extra.py")
        extra.size = 2
        yield extra, b"#\n"


@pytest.mark.parametrize("change", [_flip_onnx_byte, _traversal, _symlink, _unlisted])
def test_tampered_archive_is_rejected_and_nothing_is_published(artifacts, tmp_path, change):
    root = _exported_root(artifacts)
    good = pack_artifacts(root, "tiny-llama", ["fp32"], tmp_path / "good.tar.gz")
    bad = _rewrite(good, tmp_path / "bad.tar.gz", change)
    dest = tmp_path / "dest"
    installed = install_artifacts(good, dest)  # an existing install must survive a bad one
    before = json.loads((dest / "tiny-llama" / "fp32" / "manifest.json").read_text())
    # a second precision in the bad archive must not be published either
    with pytest.raises(ArtifactCorruptedError):
        install_artifacts(bad, dest)
    assert json.loads((dest / "tiny-llama" / "fp32" / "manifest.json").read_text()) == before
    load_artifact(installed[0].path)  # still verifies
    assert not (tmp_path / "evil.txt").exists() and not (dest.parent / "evil.txt").exists()
    assert sorted(p.name for p in dest.iterdir()) == ["tiny-llama"]  # no staging dirs left behind
    assert main(["install-artifact", str(bad), "--artifacts", str(tmp_path / "fresh")]) == 2
    assert not (tmp_path / "fresh" / "tiny-llama").exists()


def test_truncated_archive_is_rejected(artifacts, tmp_path):
    good = pack_artifacts(_exported_root(artifacts), "tiny-llama", ["fp32"], tmp_path / "good.tar.gz")
    raw = gzip.decompress(good.read_bytes())
    (tmp_path / "cut.tar.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(ArtifactCorruptedError):
        install_artifacts(tmp_path / "cut.tar.gz", tmp_path / "dest")
    assert not (tmp_path / "dest" / "tiny-llama").exists()
