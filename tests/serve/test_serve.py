"""`thyme serve` through the real `openai` client and raw HTTP: the README example's answer and its crop, streaming,
the browser guard, auth, input allow-lists, and a full server answering 429/503 instead of hanging."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.serve.conftest import README_IMAGE, README_SCRIPT, TOKEN, data_url, running_app
from thyme.backends.base import FINISH_STOP, Generation
from thyme.backends.scripted import load_script
from thyme.serve.app import scripted_factory, shared_factory

QUESTION = json.loads(README_SCRIPT.read_text())["question"]
README_ANSWER = "C. S QT 911"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _chat(url: str = "", text: str = QUESTION, **extra) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": url or data_url(README_IMAGE)}},
        {"type": "text", "text": text},
    ]
    return {"model": "thyme", "messages": [{"role": "user", "content": content}], **extra}


def _crop(url: str) -> Image.Image:
    reply = httpx.get(url, headers=AUTH, timeout=30)
    assert reply.status_code == 200, reply.text
    return Image.open(BytesIO(reply.content))


@pytest.fixture(scope="module")
def readme_server(sandbox):
    with running_app(scripted_factory(README_SCRIPT, sandbox)) as root:
        yield root


def test_openai_client_gets_the_readme_answer_and_the_crop(readme_server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=readme_server + "/v1", api_key=TOKEN, max_retries=0)
    assert [model.id for model in client.models.list()] == ["thyme"]
    body = _chat()
    completion = client.chat.completions.create(model="thyme", messages=body["messages"])
    assert completion.choices[0].message.content == README_ANSWER
    assert completion.choices[0].finish_reason == "stop"
    thyme = completion.model_extra["thyme"]
    assert thyme["has_answer"] and thyme["code_runs"] == 1 and thyme["stop_reason"] == "answer"
    assert [step["type"] for step in thyme["steps"]] == ["reasoning", "code", "sandbox_output", "reasoning", "answer"]
    code = thyme["steps"][1]["code"]
    assert "cv2.resize" in code
    [crop_url] = thyme["steps"][2]["images"]
    assert crop_url == thyme["images"][0] and crop_url.startswith(readme_server + "/v1/images/")
    assert _crop(crop_url).size == (220, 128)  # the README crop, served by the same server
    assert httpx.get(crop_url, timeout=30).status_code == 401  # crops need the token too


def test_openai_client_streams_reasoning_then_the_answer(readme_server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=readme_server + "/v1", api_key=TOKEN, max_retries=0)
    stream = client.chat.completions.create(model="thyme", messages=_chat()["messages"], stream=True)
    reasoning, content, finals = [], [], []
    for chunk in stream:
        delta = chunk.choices[0].delta
        if (delta.model_extra or {}).get("reasoning_content"):
            reasoning.append(delta.model_extra["reasoning_content"])
        if delta.content:
            content.append(delta.content)
        if chunk.choices[0].finish_reason:
            finals.append(chunk)
    assert "".join(content) == README_ANSWER
    text = "".join(reasoning)
    assert "<code>" in text and "cv2.resize" in text and "<sandbox_output>http" in text
    assert text.index("<code>") < text.index("<sandbox_output>")  # in the order they happened
    [final] = finals
    thyme = final.model_extra["thyme"]
    assert _crop(thyme["images"][0]).size == (220, 128)
    assert final.usage.prompt_tokens > 0


def test_several_images_and_follow_up_turns_reach_the_agent(sandbox, tmp_path) -> None:
    asked: list[list[dict]] = []

    class Recorder:
        def generate(self, messages, *, stop, sampling):
            asked.append(messages)
            return Generation(text="<answer>both</answer>", finish_reason=FINISH_STOP, prompt_tokens=3)

        def close(self) -> None:
            pass

    red = tmp_path / "red.png"
    Image.new("RGB", (40, 30), "red").save(red)
    with running_app(shared_factory(Recorder(), sandbox), allowed_roots=[tmp_path]) as root:
        messages = [
            {"role": "system", "content": "ignored"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(README_IMAGE)}},
                                         {"type": "text", "text": "What car?"}]},
            {"role": "assistant", "content": "A blue car."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{red}"}},
                                         {"type": "text", "text": "Same colour?"}]},
        ]  # fmt: skip
        reply = httpx.post(root + "/v1/chat/completions", json={"messages": messages}, headers=AUTH, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "both"
    user = asked[0][1]["content"]
    assert [item["type"] for item in user] == ["image", "image", "text"]
    assert "Q: What car?\nA: A blue car.\n\nNow answer this question:\nSame colour?" in user[-1]["text"]
    assert user[-1]["text"].count("### User Image Path") == 2
    assert 'image_0.jpg"' in user[-1]["text"]  # a data URL's file keeps its type's suffix for the model's code


def test_guard_auth_and_input_allow_lists(readme_server, tmp_path) -> None:
    url = readme_server + "/v1/chat/completions"
    assert httpx.get(readme_server + "/healthz", timeout=10).json()["status"] == "ok"  # no token needed
    assert httpx.post(url, json=_chat(), timeout=10).status_code == 401
    assert httpx.post(url, json=_chat(), headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    # The sandbox server's browser guard, shared: DNS rebinding, another page's Origin.
    rebinding = httpx.post(url, json=_chat(), headers={**AUTH, "Host": "attacker.example:8000"}, timeout=10)
    assert rebinding.status_code == 421 and rebinding.json()["error"]["kind"] == "host_not_allowed"
    page = httpx.post(url, json=_chat(), headers={**AUTH, "Origin": "https://evil.example"}, timeout=10)
    assert page.status_code == 403 and page.json()["error"]["kind"] == "origin_not_allowed"
    fetch = httpx.post(url, json=_chat("https://example.org/car.jpg"), headers=AUTH, timeout=10)
    assert fetch.status_code == 403 and fetch.json()["error"]["type"] == "url_not_allowed"
    outside = tmp_path / "car.jpg"
    outside.write_bytes(README_IMAGE.read_bytes())
    local = httpx.post(url, json=_chat(f"file://{outside}"), headers=AUTH, timeout=10)
    assert local.status_code == 403 and local.json()["error"]["type"] == "path_not_allowed"
    no_image = httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}]}, headers=AUTH, timeout=10)
    assert no_image.status_code == 400 and "no image in the chat" in no_image.json()["error"]["message"]
    big = httpx.post(url, content=b"{" + b" " * (49 * 2**20) + b"}", headers={**AUTH, "Content-Type":
                     "application/json"}, timeout=60)  # fmt: skip
    assert big.status_code == 413
    metrics = httpx.get(readme_server + "/metrics", headers=AUTH, timeout=10).json()
    assert metrics["errors"]["host_not_allowed"] >= 1 and metrics["errors"]["unauthorized"] >= 2


def test_without_a_token_a_simple_cross_site_post_is_refused(sandbox) -> None:
    with running_app(scripted_factory(README_SCRIPT, sandbox), token=None) as root:
        url = root + "/v1/chat/completions"
        form = httpx.post(url, content=json.dumps(_chat()), headers={"Content-Type": "text/plain"}, timeout=10)
        assert form.status_code == 403 and form.json()["error"]["kind"] == "cross_site_request"
        ok = httpx.post(url, json=_chat(), timeout=60)  # a program's JSON request, no token needed
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == README_ANSWER


def test_allowed_url_prefix_is_fetched(sandbox) -> None:
    fetched: list[str] = []

    def fetch(url: str, target: Path) -> None:
        fetched.append(url)
        target.write_bytes(README_IMAGE.read_bytes())

    from tests.fixtures.openai_server import serve
    from thyme.config import AgentConfig
    from thyme.serve.app import create_app
    from thyme.serve.config import ServeConfig

    config = ServeConfig(token=TOKEN, allowed_url_prefixes=["https://images.example.org/"])
    app = create_app(scripted_factory(README_SCRIPT, sandbox), config, AgentConfig(max_attempts=1), fetch=fetch)
    with serve(app) as root:
        ok = httpx.post(root + "/v1/chat/completions", json=_chat("https://images.example.org/17127.jpg"),
                        headers=AUTH, timeout=60)  # fmt: skip
        refused = httpx.post(root + "/v1/chat/completions", json=_chat("https://images.example.org.evil.net/x.jpg"),
                             headers=AUTH, timeout=60)  # fmt: skip
    app.state.close()
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == README_ANSWER
    assert refused.status_code == 403 and fetched == ["https://images.example.org/17127.jpg"]


class _Gate:
    """A backend that answers only once the test opens the gate: requests stay in flight as long as needed."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered = threading.Semaphore(0)

    def generate(self, messages, *, stop, sampling) -> Generation:
        self.entered.release()
        assert self.open.wait(60)
        return Generation(text="<answer>done</answer>", finish_reason=FINISH_STOP, prompt_tokens=1)

    def close(self) -> None:
        pass


def _wait_for_load(root: str, running: int, waiting: int) -> None:
    for _ in range(600):
        health = httpx.get(root + "/healthz", timeout=10).json()
        if (health["running"], health["waiting"]) == (running, waiting):
            return
        threading.Event().wait(0.1)
    raise AssertionError(f"the server never had {running} running and {waiting} waiting: {health}")


def test_a_full_server_answers_429_and_a_long_queue_503(sandbox) -> None:
    gate = _Gate()
    with running_app(shared_factory(gate, sandbox), max_running=2, max_queue=2, queue_wait_s=60) as root:
        url = root + "/v1/chat/completions"
        with ThreadPoolExecutor(6) as pool:
            admitted = [pool.submit(httpx.post, url, json=_chat(), headers=AUTH, timeout=120) for _ in range(4)]
            _wait_for_load(root, running=2, waiting=2)
            refused = [httpx.post(url, json=_chat(), headers=AUTH, timeout=30) for _ in range(2)]
            gate.open.set()
            answers = [future.result() for future in admitted]
        assert [r.status_code for r in refused] == [429, 429] and refused[0].headers["Retry-After"]
        assert [r.status_code for r in answers] == [200] * 4
        assert httpx.get(root + "/metrics", headers=AUTH, timeout=10).json()["errors"]["server_full"] == 2

    gate = _Gate()
    with running_app(shared_factory(gate, sandbox), max_running=1, max_queue=1, queue_wait_s=0.5) as root:
        url = root + "/v1/chat/completions"
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, url, json=_chat(), headers=AUTH, timeout=120)
            assert gate.entered.acquire(timeout=60)
            waited = httpx.post(url, json=_chat(), headers=AUTH, timeout=30)
            gate.open.set()
            assert first.result().status_code == 200
        assert waited.status_code == 503 and waited.json()["error"]["type"] == "server_busy"


def test_bounded_load_on_loopback(sandbox) -> None:
    """32 requests from 8 client threads against 4 slots and a queue of 16: every one gets the README answer."""
    with running_app(scripted_factory(README_SCRIPT, sandbox), max_running=4, max_queue=16) as root:
        body = _chat()

        def ask(_: int) -> tuple[int, str]:
            reply = httpx.post(root + "/v1/chat/completions", json=body, headers=AUTH, timeout=300)
            return reply.status_code, reply.json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(ask, range(32)))
        metrics = httpx.get(root + "/metrics", headers=AUTH, timeout=10).json()
    assert results == [(200, README_ANSWER)] * 32
    assert metrics["requests_answered"] == 32 and metrics["running"] == 0 and metrics["waiting"] == 0
    assert load_script(README_SCRIPT)  # the script itself was never consumed: a fresh replay per request


def test_a_backend_failure_is_a_502_plain_and_an_error_event_streaming(sandbox) -> None:
    from openai import APIError, APIStatusError, OpenAI

    from thyme.errors import BackendError

    class Down:
        def generate(self, messages, *, stop, sampling):
            raise BackendError("the inference server at http://gpu:8001 refused the connection")

        def close(self) -> None:
            pass

    with running_app(shared_factory(Down(), sandbox)) as root:
        client = OpenAI(base_url=root + "/v1", api_key=TOKEN, max_retries=0)
        with pytest.raises(APIStatusError) as plain:
            client.chat.completions.create(model="thyme", messages=_chat()["messages"])
        assert plain.value.status_code == 502 and "refused the connection" in plain.value.message
        with pytest.raises(APIError, match="refused the connection"):
            list(client.chat.completions.create(model="thyme", messages=_chat()["messages"], stream=True))
        health = httpx.get(root + "/healthz", timeout=10).json()
    assert health["running"] == 0 and health["waiting"] == 0  # both slots came back
