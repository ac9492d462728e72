"""The fake OpenAI server itself: its extra endpoints, control API and process mode."""

from __future__ import annotations

import asyncio

import httpx2
import pytest

from ai_worker import ProviderConfig, RetryableLLMError, create_llm_client
from tests.fakes.fixtures import fake_openai_process
from tests.fakes.openai_server import (
    Echo,
    FakeOpenAIServer,
    behaviour_from_json,
    behaviour_to_json,
    delay,
    disconnect,
    malformed,
    reply,
    status,
)

HELLO = [{"role": "user", "content": "hello"}]


async def test_models_and_unknown_paths(fake_openai: FakeOpenAIServer) -> None:
    async with httpx2.AsyncClient(base_url=fake_openai.url) as http:
        models = await http.get("/v1/models")
        root_models = await http.get("/models")
        missing = await http.post("/v1/embeddings", json={})
        bad = await http.post("/v1/chat/completions", json={"model": "m"})

    assert models.json()["data"][0]["id"] == "fake-model"
    assert root_models.status_code == 200
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "unknown_url"
    assert bad.status_code == 400
    assert [r.path for r in fake_openai.requests] == [
        "/v1/models",
        "/models",
        "/v1/embeddings",
        "/v1/chat/completions",
    ]


async def test_scripted_behaviours_run_in_order_then_default(
    fake_openai: FakeOpenAIServer,
) -> None:
    fake_openai.default = reply("default answer")
    fake_openai.script(reply("one"), status(500), reply("two"))
    async with httpx2.AsyncClient(base_url=fake_openai.base_url) as http:
        bodies = []
        for _ in range(4):
            response = await http.post("/chat/completions", json={"model": "m", "messages": HELLO})
            bodies.append(
                response.json()["choices"][0]["message"]["content"]
                if response.status_code == 200
                else response.status_code
            )
    assert bodies == ["one", 500, "two", "default answer"]
    assert fake_openai.pending == 0


async def test_stop_cuts_delays_short() -> None:
    server = await FakeOpenAIServer(default=delay(30)).start()
    async with httpx2.AsyncClient(base_url=server.base_url, timeout=10) as http:
        pending = asyncio.create_task(
            http.post("/chat/completions", json={"model": "m", "messages": HELLO})
        )
        await server.wait_for_requests(1)
        await asyncio.wait_for(server.stop(), 5)
        response = await asyncio.wait_for(pending, 5)
    assert response.status_code == 200  # answered at once with the echo


@pytest.mark.parametrize(
    "behaviour",
    [reply("x", finish_reason="length"), status(429, retry_after=2), delay(1, status(500))],
)
def test_behaviours_round_trip_through_json(behaviour: object) -> None:
    assert behaviour_from_json(behaviour_to_json(behaviour)) == behaviour  # type: ignore[arg-type]


def test_behaviour_json_errors() -> None:
    with pytest.raises(ValueError, match="unknown behaviour kind"):
        behaviour_from_json({"kind": "explode"})
    with pytest.raises(ValueError, match="bad fields"):
        behaviour_from_json({"kind": "reply", "txt": "typo"})
    with pytest.raises(ValueError, match="unknown malformed kind"):
        malformed("weird")  # type: ignore[arg-type]
    assert behaviour_from_json({"kind": "disconnect"}) == disconnect()


async def test_process_mode_with_control_api() -> None:
    """What the platform's end-to-end tests do: run the fake as a process and script it."""
    with fake_openai_process(["--reply-mode", "fixed", "--fixed-text", "Hi from the fake"]) as url:
        cfg = ProviderConfig(model="m", base_url=url, api_key="sk-e2e-0000", timeout_s=5)
        async with create_llm_client(cfg) as client, httpx2.AsyncClient() as http:
            assert (await client.complete(HELLO)).text == "Hi from the fake"  # type: ignore[arg-type]

            root = url.removesuffix("/v1")
            scripted = await http.post(
                f"{root}/_fake/script", json=[behaviour_to_json(status(503, retry_after=4))]
            )
            assert scripted.json() == {"pending": 1}
            with pytest.raises(RetryableLLMError) as info:
                await client.complete(HELLO)  # type: ignore[arg-type]
            assert info.value.retry_after_s == 4

            recorded = (await http.get(f"{root}/_fake/requests")).json()["requests"]
            assert [r["headers"]["authorization"] for r in recorded] == ["Bearer sk-e2e-0000"] * 2
            assert recorded[0]["json"]["messages"] == HELLO
            await http.post(f"{root}/_fake/reset")
            assert (await http.get(f"{root}/_fake/requests")).json()["requests"] == []


async def test_process_mode_fail_status() -> None:
    with fake_openai_process(["--fail-status", "500"]) as url:
        async with create_llm_client(ProviderConfig(model="m", base_url=url)) as client:
            with pytest.raises(RetryableLLMError) as info:
                await client.complete(HELLO)  # type: ignore[arg-type]
    assert info.value.status == 500


async def test_echo_all_names_every_question_after_the_last_answer(
    fake_openai: FakeOpenAIServer,
) -> None:
    fake_openai.script(Echo(all_pending=True))
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "user", "content": "q3"},
        ],
    }
    async with httpx2.AsyncClient() as http:
        r = await http.post(f"{fake_openai.base_url}/chat/completions", json=body)
    assert r.json()["choices"][0]["message"]["content"] == "q2\nq3"
