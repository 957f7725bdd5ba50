"""The server as clients see it: the official openai client, raw HTTP for errors and admin."""

import concurrent.futures as futures
import time
import os
import re

import httpx
import openai
import pytest

from .conftest import ADMIN_KEY, API_KEY, start_server, stop


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def chat(oai, model, text="Order: two mugs to Lima.", **kw):
    kw.setdefault("temperature", 0)
    return oai.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], max_tokens=12, **kw)


def test_models_lists_base_and_adapters(oai, tiny_model_dir):
    ids = [m.id for m in oai.models.list().data]
    assert ids[0] == str(tiny_model_dir) and {"alpha", "beta"} <= set(ids)


@pytest.mark.parametrize("model", ["alpha", "base"])
def test_chat_completion_with_adapter_and_base(oai, model):
    response = chat(oai, model)
    assert response.object == "chat.completion" and response.model == model
    choice = response.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 5 and response.usage.completion_tokens >= 1
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_adapters_change_the_answer(oai):
    answers = {m: chat(oai, m).choices[0].message.content for m in ("alpha", "beta", "base")}
    assert len(set(answers.values())) > 1


def test_streaming_chat_matches_non_streaming(oai):
    expected = chat(oai, "alpha").choices[0].message.content
    chunks = list(chat(oai, "alpha", stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_plain_and_streaming(oai):
    plain = oai.completions.create(model="beta", prompt="The order is", max_tokens=6, temperature=0)
    assert plain.object == "text_completion" and plain.usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].text for c in oai.completions.create(model="beta", prompt="The order is", max_tokens=6, temperature=0, stream=True))
    assert streamed == plain.choices[0].text


def test_seed_makes_sampling_repeatable(oai):
    a = chat(oai, "alpha", seed=7, temperature=0.9).choices[0].message.content
    b = chat(oai, "alpha", seed=7, temperature=0.9).choices[0].message.content
    assert a == b


def test_simple_generate(server):
    r = server.client().post("/generate", json={"prompt": "Order:", "max_tokens": 5, "temperature": 0, "adapter": "beta"})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "beta" and isinstance(body["generated_text"], str)
    assert body["usage"]["completion_tokens"] >= 1


def test_mixed_adapter_batches_give_each_adapters_own_tokens(oai, server):
    """Greedy: requests for different adapters decoded in one batch = each decoded alone."""
    models = ["alpha", "beta", "base", "alpha", "beta", "base"]
    alone = {m: chat(oai, m).choices[0].message.content for m in set(models)}
    with futures.ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(lambda m: chat(oai, m).choices[0].message.content, models))
    assert together == [alone[m] for m in models]
    metrics = server.client().get("/metrics").text
    batched = [float(v) for v in re.findall(r'llm_batch_size_bucket\{le="1.0"\} (\S+)', metrics)]
    total = [float(v) for v in re.findall(r"llm_batch_size_count (\S+)", metrics)]
    assert total[0] > batched[0]  # some batches held more than one request


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}, 400, "max_tokens"),
        ({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400, "temperature"),
        ({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
        ({"model": "alpha", "messages": []}, 400, "messages"),
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ],
)
def test_errors_have_the_openai_shape_and_status(server, body, status, param):
    r = server.client().post("/v1/chat/completions", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["code"] == status and error["param"] == param and error["message"]


def test_unknown_fields_are_ignored(server):
    r = server.client().post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logit_bias": {}, "user": "u1"})
    assert r.status_code == 200


def test_body_size_limit(server):
    r = server.client().post("/v1/completions", json={"model": "alpha", "prompt": "x" * 50_000})
    assert r.status_code == 413


def test_authentication(server):
    assert server.client(key=None).get("/health").status_code == 200  # liveness needs no key
    assert server.client(key=None).get("/v1/models").status_code == 401
    assert server.client(key="wrong").post("/v1/completions", json={"model": "alpha", "prompt": "x"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def _admin(server, key=ADMIN_KEY):
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.mark.parametrize("path", ["../adapters", "/etc", "alpha-copy/../../x", "escape"])
def test_adapter_loading_is_confined_to_the_root(server, tmp_path, path):
    if path == "escape":
        os.symlink(tmp_path, server.adapter_root / "escape")  # a link pointing outside the root
    r = _admin(server).post("/v1/adapters", json={"name": "evil", "path": path})
    assert r.status_code == 400
    assert "adapter root" in r.json()["error"]["message"] or "no adapter" in r.json()["error"]["message"]


def test_adapter_admin_needs_the_admin_key(server):
    assert _admin(server, key=API_KEY).post("/v1/adapters", json={"name": "x", "path": "alpha-copy"}).status_code == 401
    assert _admin(server, key=API_KEY).delete("/v1/adapters/alpha").status_code == 401


def test_pickled_adapters_are_refused(server):
    bad = server.adapter_root / "pickled"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    (bad / "adapter_model.bin").write_bytes(b"not loaded")
    r = _admin(server).post("/v1/adapters", json={"name": "pickled", "path": "pickled"})
    assert r.status_code == 400 and "safetensors" in r.json()["error"]["message"]


def test_load_and_unload_while_serving(server, oai):
    r = _admin(server).post("/v1/adapters", json={"name": "gamma", "path": "alpha-copy"})
    assert r.status_code == 200, r.text
    assert "gamma" in [m.id for m in oai.models.list().data]
    assert chat(oai, "gamma").choices[0].message.content == chat(oai, "alpha").choices[0].message.content  # same weights
    assert _admin(server).delete("/v1/adapters/gamma").status_code == 200
    with pytest.raises(openai.NotFoundError):
        chat(oai, "gamma")
    assert chat(oai, "alpha").choices  # the others keep serving


def test_metrics_are_exported(server, oai):
    chat(oai, "alpha")
    text = server.client().get("/metrics").text
    for name in (
        "llm_request_duration_seconds_bucket", "llm_time_to_first_token_seconds_bucket", "llm_time_per_output_token_seconds_bucket",
        "llm_prompt_tokens_total", "llm_generated_tokens_total", "llm_requests_total", "llm_queue_depth", "llm_batch_size_bucket",
        "llm_adapters_loaded",
    ):
        assert name in text, name


def test_flood_gets_429_with_retry_after(tmp_path, tiny_model_dir):
    server = start_server(tiny_model_dir, {}, tmp_path, "--set", "serve.max_queue=2", "--set", "serve.max_batch_size=1", api_key=None)
    try:
        def one(_):
            return httpx.post(server.url + "/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 64, "temperature": 0}, timeout=120)
        with futures.ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(one, range(24)))
        codes = [r.status_code for r in responses]
        assert 429 in codes and 200 in codes
        limited = next(r for r in responses if r.status_code == 429)
        assert limited.headers["Retry-After"] and limited.json()["error"]["type"] == "rate_limit_error"
        assert set(codes) <= {200, 429}
    finally:
        stop(server)


def test_schemathesis_finds_no_server_error(server):
    """Property-based requests generated from the server's own OpenAPI schema: never a 5xx."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    st = shutil.which("st") or str(Path(sys.executable).parent / "st")
    result = subprocess.run(
        [st, "run", server.url + "/openapi.json", "--checks", "not_a_server_error", "--max-examples", "12",
         "-H", f"Authorization: Bearer {API_KEY}", "--request-timeout", "60", "--phases", "examples,coverage,fuzzing"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_generation_stops_when_the_client_disconnects(server):
    def cancelled() -> float:
        found = re.findall(r'llm_requests_total\{status="cancelled"\} (\S+)', server.client().get("/metrics").text)
        return float(found[0]) if found else 0.0

    before = cancelled()
    body = {"model": "alpha", "messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 64, "temperature": 0.8, "stream": True}
    with server.client().stream("POST", "/v1/chat/completions", json=body) as response:
        next(response.iter_lines())  # the first event, then hang up
    deadline = time.time() + 30
    while time.time() < deadline and cancelled() <= before:
        time.sleep(0.1)
    assert cancelled() > before
