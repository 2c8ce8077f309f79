"""The runtime without torch/transformers: a fresh process with those imports blocked loads artifacts,
generates, streams, embeds and runs the manager, and ends with neither in ``sys.modules``.

Runs in the full venv (imports blocked) and in ``.ci/run``'s runtime-only venv (not installed), where
``TTA_TEST_DEFAULT_ARTIFACTS`` also points at the two packaged default models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tta_engine.runtime import open_artifact_lm

MSGS = [{"role": "system", "content": "You are a calm narrator."}, {"role": "user", "content": "I open the door."}]

CHECK = r"""
import asyncio, json, sys
from pathlib import Path

BLOCKED = ("torch", "transformers", "optimum", "sentence_transformers", "accelerate", "bitsandbytes")

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked: {name}", name=name)
        return None

sys.meta_path.insert(0, Block())
args = json.loads(sys.argv[1])
from tta_engine.config import model_config_from_dict
from tta_engine.embeddings import open_encoder
from tta_engine.errors import BackendUnavailableError
from tta_engine.manager import TransformersModelManager
from tta_engine.runtime import open_language_model, open_torch_lm

cfgs = {name: model_config_from_dict(name, raw) for name, raw in args["configs"].items()}
root, lm_name, emb_name, msgs = args["root"], args["lm"], args["embedder"], args["messages"]
out = {}
lm = open_language_model(cfgs[lm_name], artifacts_root=root, backend="onnx")
done = lm.generate(msgs, temperature=0, max_new_tokens=12)
out["generate"] = done["token_ids"]
out["stream"] = "".join(lm.stream(msgs, temperature=0, max_new_tokens=12)) == done["text"]
lm.close()
out["embed"] = open_encoder(cfgs[emb_name], artifacts_root=root, backend="onnx").encode(["calm", "storm"]).tolist()
manager = TransformersModelManager(cfgs, artifacts_root=root)

async def managed():
    parts = [d async for d in manager.astream(msgs, lm_name, max_tokens=12, temperature=0)]
    return "".join(parts), await manager.generate(msgs, lm_name, max_tokens=12, temperature=0)

streamed, text = asyncio.run(managed())
out["manager"] = streamed == text == done["text"]
out["manager_embed"] = manager.get_embeddings(["calm", "storm"], emb_name)
manager.close()
for what, call in (("export", lambda: __import__("tta_engine.export.pipeline")),
                   ("torch", lambda: open_torch_lm(cfgs[lm_name]))):
    try:
        call()
        out[what] = None
    except BackendUnavailableError as exc:
        out[what] = str(exc)
out["leaked"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps(out))
"""


def _run(root, configs, lm, embedder) -> dict:
    args = json.dumps({"root": str(root), "configs": configs, "lm": lm, "embedder": embedder, "messages": MSGS})
    proc = subprocess.run([sys.executable, "-c", CHECK, args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(out: dict, want_ids: list[int]) -> None:
    assert out["leaked"] == []
    assert out["generate"] == want_ids
    assert out["stream"] and out["manager"]
    np.testing.assert_allclose(out["embed"], out["manager_embed"], atol=1e-6)
    assert "pip install 'tta-engine[export]'" in out["export"]
    assert "pip install 'tta-engine[torch]'" in out["torch"]


def test_tiny_models_without_torch(artifacts, tiny_configs):
    lm_art = artifacts.get("tiny-llama", "fp32")
    artifacts.get("tiny-bert", "fp32")
    configs = {n: {"model_type": c.model_type, "source": {"kind": "local", "path": "/nonexistent"},
                   "max_tokens": 24, "context_length": 256, **({"embedding_dimension": 64} if c.is_embedding else {})}
               for n, c in tiny_configs.items() if n in ("tiny-llama", "tiny-bert")}
    out = _run(lm_art.path.parents[1], configs, "tiny-llama", "tiny-bert")
    want = open_artifact_lm(lm_art).generate(MSGS, temperature=0, max_new_tokens=12)["token_ids"]
    _check(out, want)


@pytest.mark.e2e
@pytest.mark.skipif(not os.environ.get("TTA_TEST_DEFAULT_ARTIFACTS"),
                    reason="set by .ci/run's runtime-only venv, which installs the packed default artifacts")
def test_default_models_without_torch():
    from tta_engine.artifact import artifact_dir, load_artifact
    from tta_engine.config import load_model_configs

    root = os.environ["TTA_TEST_DEFAULT_ARTIFACTS"]
    cfgs = load_model_configs()
    lm, emb = cfgs["smollm2-135m-instruct"], cfgs["all-minilm-l6-v2"]
    configs = {c.name: {"model_type": c.model_type, "precision": c.precision, "source": {"kind": "local", "path": "/x"},
                        "max_tokens": 64, **({"embedding_dimension": 384} if c.is_embedding else {})} for c in (lm, emb)}
    out = _run(root, configs, lm.name, emb.name)
    art = load_artifact(artifact_dir(root, lm.name, lm.precision))
    _check(out, open_artifact_lm(art).generate(MSGS, temperature=0, max_new_tokens=12)["token_ids"])
    assert len(out["embed"][0]) == 384
