"""Faults on disk and at the command line (issue 9, defects 5 and 6): damaged artifacts are typed errors
and never re-exported behind the caller's back, the previous artifact stays usable, loads do not re-hash,
dead exports' staging is cleaned, quantization leaves logging alone, the CLI fails cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import threading

import pytest
from tta_engine import artifact as artifact_mod
from tta_engine import cli
from tta_engine.artifact import load_artifact
from tta_engine.errors import ArtifactCorruptedError, ArtifactMissingError
from tta_engine.manager import TransformersModelManager

MSGS = [{"role": "user", "content": "The lantern flickers in the forest."}]


def run(coro):
    return asyncio.run(coro)


def published_copy(src_art, root, name="tiny-llama"):
    """A copy of an exported artifact under ``root/<name>/fp32`` (a plain directory)."""
    dst = root / name / src_art.precision
    shutil.copytree(src_art.path, dst)
    return dst


def flip_byte(p):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte": lambda d: flip_byte(d / "model.onnx"),
    "truncated file": lambda d: (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:1000]),
    "missing manifest": lambda d: (d / "manifest.json").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_artifact_is_a_typed_error_and_the_loaded_one_keeps_serving(artifacts, tiny_configs, tmp_path,
                                                                            damage):
    art = artifacts.get("tiny-llama", "fp32")
    path = published_copy(art, tmp_path)
    m = TransformersModelManager(tiny_configs, artifacts_root=tmp_path)  # default: no export on demand
    try:
        before = run(m.generate(MSGS, "tiny-llama", max_tokens=6, temperature=0))
        DAMAGE[damage](path)
        with pytest.raises(ArtifactCorruptedError, match="tta-engine export tiny-llama --precision fp32"):
            load_artifact(path)
        # the model loaded before the damage keeps serving, unchanged
        assert run(m.generate(MSGS, "tiny-llama", max_tokens=6, temperature=0)) == before
        m.unload_model("tiny-llama")
        with pytest.raises(ArtifactCorruptedError):  # a reload is refused: no silent re-export, no fallback
            run(m.generate(MSGS, "tiny-llama", max_tokens=6, temperature=0))
        assert m.stats()["tiny-llama"]["loads"] == 1
        assert sorted(p.name for p in (tmp_path / "tiny-llama").iterdir()) == ["fp32"]  # nothing exported
    finally:
        m.close()


def test_missing_artifact_names_the_export_command(tiny_configs, tmp_path):
    m = TransformersModelManager(tiny_configs, artifacts_root=tmp_path, backend="onnx")
    try:
        with pytest.raises(ArtifactMissingError, match="tta-engine export tiny-llama --precision fp32"):
            run(m.generate(MSGS, "tiny-llama", max_tokens=4))
        assert not (tmp_path / "tiny-llama").exists()
    finally:
        m.close()


def test_export_on_demand_is_explicit_and_announced(tiny_configs, tmp_path, caplog):
    m = TransformersModelManager(tiny_configs, artifacts_root=tmp_path, export_on_demand=True)
    try:
        with caplog.at_level(logging.WARNING, logger="tta_engine.manager"):
            vec = m.get_embeddings(["calm"], "tiny-bert")
        assert len(vec[0]) == 64 and m.stats()["tiny-bert"]["backend"] == "onnx"
        lines = [r.getMessage() for r in caplog.records if r.name == "tta_engine.manager"]
        assert any("exporting it now" in line for line in lines)
        assert any(line.startswith("[6/6]") for line in lines)  # each stage announced
        load_artifact(tmp_path / "tiny-bert" / "fp32")
    finally:
        m.close()


def test_loads_hash_each_artifact_once_until_a_file_changes(artifacts, tmp_path, monkeypatch):
    path = published_copy(artifacts.get("tiny-llama", "fp32"), tmp_path)
    hashed = []
    real = artifact_mod.sha256_file
    monkeypatch.setattr(artifact_mod, "sha256_file", lambda p, *a: (hashed.append(p.name), real(p, *a))[1])
    load_artifact(path)
    first = len(hashed)
    assert first >= 3
    load_artifact(path)
    load_artifact(path)
    assert len(hashed) == first  # unchanged files: not hashed again
    flip_byte(path / "model.onnx")  # same size, new mtime
    with pytest.raises(ArtifactCorruptedError, match="sha256"):
        load_artifact(path)
    load_artifact(artifacts.get("tiny-llama", "fp32").path, rehash=True)  # `tta-engine verify` always hashes


def test_next_export_removes_what_dead_exports_left(tiny_configs, tmp_path):
    from tta_engine.export.pipeline import ExportOptions, export_model

    root = tmp_path / "arts"
    model_root = root / "tiny-bert"
    (model_root / ".work-dead1").mkdir(parents=True)
    (model_root / ".work-dead1" / "fused.onnx").write_bytes(b"x" * 1000)
    (model_root / ".fp32-dead2").mkdir()  # a staged directory never published
    (model_root / ".int4.link-999999").symlink_to(".fp32-dead2")
    art = export_model(tiny_configs["tiny-bert"], ExportOptions(out_root=root), quiet=True)
    names = sorted(p.name for p in model_root.iterdir())
    target = (model_root / "fp32").resolve().name
    assert names == sorted([".export.lock", "fp32", target]), names
    assert art.path == model_root / "fp32"


def test_quantization_leaves_other_threads_logging_alone(monkeypatch, tmp_path):
    from tta_engine.export import quantize as q

    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    root = logging.getLogger()
    handler = Catch(level=logging.INFO)
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)

    def fake_quantize(src, dst, precision, block_size):
        levels = (root.level, logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").level)
        logging.info("node by node chatter")  # the quantizer's own thread: dropped
        t = threading.Thread(target=lambda: logging.getLogger("game").info("another thread"))
        t.start()
        t.join()
        return {"levels": levels}

    monkeypatch.setattr(q, "_quantize", fake_quantize)
    try:
        out = q.quantize(tmp_path / "a.onnx", tmp_path / "b.onnx", "int8")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert out["levels"][0] == logging.INFO  # the root logger's level was not raised
    assert "another thread" in seen and "node by node chatter" not in seen


# -- the command line ----------------------------------------------------------------------------------

@pytest.fixture()
def cli_env(artifacts, tiny_dirs, tmp_path):
    for name in ("tiny-llama", "tiny-bert"):
        artifacts.get(name, "fp32")
    cfg = tmp_path / "models.toml"
    cfg.write_text(
        f'[models.tiny-llama]\nmodel_type = "causal_lm"\ncontext_length = 256\nvalidation = {{ int4 = {{ min_top1 = 0.5 }} }}\nmax_tokens = 64\n'
        f'source = {{ kind = "local", path = "{tiny_dirs["llama"]}" }}\n'
        f'[models.tiny-bert]\nmodel_type = "embedding"\nembedding_dimension = 64\n'
        f'source = {{ kind = "local", path = "{tiny_dirs["bert"]}" }}\n')
    return ["--config", str(cfg), "--artifacts", str(artifacts.root / "auto")]


def test_cli_models_never_says_ok_for_unhashed_files(cli_env, artifacts, tmp_path, capsys):
    path = published_copy(artifacts.get("tiny-llama", "fp32"), tmp_path / "arts")
    flip_byte(path / "model.onnx")
    common = [cli_env[0], cli_env[1], "--artifacts", str(tmp_path / "arts")]
    assert cli.main(["models", *common]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "not verified" in rows["tiny-llama"] and " ok " not in rows["tiny-llama"]
    assert "missing" in rows["tiny-bert"]
    assert cli.main(["models", *common, "--verify"]) == 0
    assert "corrupted" in {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}["tiny-llama"]


@pytest.mark.parametrize("argv, message", [
    (["embed", "tiny-llama", "hi"], "is a causal_lm model, not a embedding model"),
    (["generate", "tiny-bert", "hi"], "is a embedding model, not a causal_lm model"),
    (["generate", "tiny-llama", ""], "prompt is empty"),
    (["generate", "tiny-llama", "  "], "prompt is empty"),
    (["generate", "tiny-llama", "hi", "--temperature", "nan"], "temperature"),
])
def test_cli_bad_input_is_a_clean_error(cli_env, argv, message, capsys):
    assert cli.main([*argv, *cli_env]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_closed_stdout_exits_quietly(cli_env):
    proc = subprocess.Popen([sys.executable, "-m", "tta_engine.cli", "generate", "tiny-llama", "Tell me a story",
                             "--max-new-tokens", "60", "--temperature", "0", *cli_env],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(proc.stdout.read(3)) == 3
    proc.stdout.close()  # like `| head -c 3`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_a_new_process_trusts_the_stamp_of_unchanged_files_only(artifacts, tmp_path, monkeypatch):
    """The signature of a verified artifact is kept beside its files, so a new process does not hash an
    unchanged artifact again (cold start); a file changed in place is hashed and rejected."""
    path = published_copy(artifacts.get("tiny-llama", "fp32"), tmp_path)
    hashed = []
    real = artifact_mod.sha256_file
    monkeypatch.setattr(artifact_mod, "sha256_file", lambda p, *a: (hashed.append(p.name), real(p, *a))[1])
    load_artifact(path)
    assert hashed and (path / artifact_mod.VERIFIED_STAMP).is_file()
    hashed.clear()
    artifact_mod._verified.clear()  # what a new process knows
    load_artifact(path)
    assert hashed == []
    flip_byte(path / "model.onnx")
    artifact_mod._verified.clear()
    with pytest.raises(ArtifactCorruptedError, match="sha256"):
        load_artifact(path)
    assert not (path / artifact_mod.VERIFIED_STAMP).exists()


def test_read_only_artifacts_load_without_a_stamp(artifacts, tmp_path):
    path = published_copy(artifacts.get("tiny-llama", "fp32"), tmp_path)
    (path / artifact_mod.VERIFIED_STAMP).unlink(missing_ok=True)
    path.chmod(0o555)
    try:
        artifact_mod._verified.clear()
        if os.access(path, os.W_OK):  # root ignores the mode: make the stamp write fail another way
            (path / f"{artifact_mod.VERIFIED_STAMP}.{os.getpid()}.tmp").mkdir()
        assert load_artifact(path).manifest
        assert not (path / artifact_mod.VERIFIED_STAMP).is_file()
    finally:
        path.chmod(0o755)
