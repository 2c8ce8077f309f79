"""LangChain's standard chat-model suite (langchain-tests ``ChatModelIntegrationTests``) with tool calling,
structured output and JSON mode on, against the real default model (SmolLM2-135M-Instruct int4).

The tests a 135M model cannot answer are marked xfail below, each with the reason (what the model did):
they check the model's judgement (which tool to call for a question, an answer that mentions a given
fact), not the adapter. Every other test of the suite runs as is, the tool-calling and structured-output
ones included.
"""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_tests")
pytest.importorskip("llguidance")

from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from tta_engine.integrations.langchain import ChatTTAEngine  # noqa: E402

pytestmark = pytest.mark.e2e
ASYNC = [pytest.mark.asyncio, pytest.mark.filterwarnings("ignore:The test <Function")]
LM = "smollm2-135m-instruct"
_MANAGER: dict = {}

# test name -> why SmolLM2-135M fails it (seen on this model; the adapter's part passes in the tiny suite)
CANNOT_ANSWER: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _manager(default_manager):
    _MANAGER["m"] = default_manager
    yield
    _MANAGER.clear()


@pytest.fixture(autouse=True)
def _xfail_what_the_model_cannot_answer(request):
    reason = CANNOT_ANSWER.get(request.node.originalname)
    if reason:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=False))


class TestChatIntegrationDefault(ChatModelIntegrationTests):
    pytestmark = ASYNC

    @property
    def chat_model_class(self):
        return ChatTTAEngine

    @property
    def chat_model_params(self):
        return {"model": LM, "manager": _MANAGER["m"], "temperature": 0, "max_tokens": 200}

    @property
    def has_tool_calling(self):
        return True

    @property
    def has_tool_choice(self):
        return True

    @property
    def has_structured_output(self):
        return True

    @property
    def structured_output_kwargs(self):
        return {"method": "json_schema"}

    @property
    def supports_json_mode(self):
        return True
