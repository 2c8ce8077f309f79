"""Programs end cleanly: a process that used the engine (plain generation, structured output through the
manager and each integration, a request still decoding) exits with its own status, never a native abort
(``terminate called without an active exception``, status 134) at interpreter shutdown.

The abort came from a daemon scheduler thread still inside an ONNX Runtime call (a decode step, or the
idle recompute of a finished reply) when the interpreter finalized: on waking it was ended by unwinding
through ORT's C++ frames. Scheduler.close runs at exit now (engine/scheduler.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # on the real default model: its ORT calls take long enough to be caught at exit
SCRIPT = str(Path(__file__).with_name("exit_paths.py"))
PATHS = ["generate", "structured", "pydantic_ai", "guidance", "langchain", "spacy", "midstream"]
NEEDS = {"structured": "llguidance", "pydantic_ai": "pydantic_ai", "guidance": "guidance",
         "langchain": "langchain_core", "spacy": "spacy"}


@pytest.fixture(scope="module")
def program(default_artifacts):
    root, _, _ = default_artifacts
    return [sys.executable, SCRIPT, "smollm2-135m-instruct", "null", str(root)]


def _run(program, path: str, how: str) -> subprocess.CompletedProcess:
    pytest.importorskip(NEEDS.get(path, "tta_engine"))
    cmd = [*program[:2], path, how, *program[2:]]
    if how != "sigterm":
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the path's work is done once READY is printed
        if line.strip() == "READY":
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


CASES = [(p, how, status) for p in PATHS for how, status in (("return", 0), ("sys_exit", 3))]
CASES += [(p, "sigterm", -signal.SIGTERM) for p in ("structured", "midstream")]


@pytest.mark.parametrize("path,how,status", CASES)
def test_program_exits_with_its_own_status(program, path, how, status):
    out = _run(program, path, how)
    assert "terminate called" not in out.stderr, out.stderr[-2000:]
    assert out.returncode == status, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
