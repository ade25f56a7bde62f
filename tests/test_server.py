"""fastface serve: the real server (uvicorn on a free local port) talked to by the openai client and raw HTTP."""

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

import fastface
from fastface.server import ServerSettings, create_app

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a background thread, until ``stop()``."""

    def __init__(self, app):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def pipe():
    return fastface.load()


@pytest.fixture(scope="module")
def server(pipe):
    live = LiveServer(create_app(pipe, ServerSettings(max_batch=16, max_wait_ms=50, max_steps=16, max_n=4,
                                                      max_body_bytes=256 * 1024, api_key=KEY)))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _auth():
    return {"Authorization": f"Bearer {KEY}"}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# ------------------------------------------------------------------------------------------- the happy path
def test_images_generate_with_the_openai_client(client, pipe):
    result = client.images.generate(model="face-s", prompt="a smiling woman with red hair", n=2, size="64x64",
                                    response_format="b64_json", extra_body={"seed": 5, "steps": 4})
    assert len(result.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    # exactly what the library draws for the same prompt and seeds
    expected = pipe.generate(["a smiling woman with red hair"] * 2, steps=4, seed=[5, 6])
    for got, want in zip(images, expected):
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_images_with_faster_than_exact_options(client, pipe):
    fast = dict(guidance_steps=2, uncond_refresh=2, kv_refresh=2)
    result = client.images.generate(model="face-s", prompt="a man with a beard", n=1, response_format="b64_json",
                                    extra_body={"seed": 3, "steps": 4, **fast})
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))))
    want = pipe.generate(["a man with a beard"], steps=4, seed=[3], **fast)[0]
    assert np.array_equal(got, np.asarray(want))


def test_chat_completion_with_an_image(client, pipe):
    face = pipe.generate(["a woman with red hair"], steps=4, seed=0)[0]
    result = client.chat.completions.create(model="face-s", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(_png(face))}},
        {"type": "text", "text": "what colour is her hair?"}]}])
    expected = pipe.answer([face], ["what colour is her hair?"])[0]
    assert result.choices[0].message.content == expected
    assert result.choices[0].message.role == "assistant" and result.usage.completion_tokens >= 1


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["face-s"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    assert "fastface_requests_total" in text and "fastface_batch_rows" in text and "fastface_tokens_total" in text


# -------------------------------------------------------------------------------------------- batching
def test_a_request_alone_and_among_15_others_gives_the_same_bytes(server):
    body = dict(prompt="an old man with a grey beard", n=1, seed=11, steps=4)
    alone = httpx.post(server.url + "/v1/images/generations", json=body, headers=_auth(), timeout=120).json()

    def post(i):
        b = body if i == 7 else dict(prompt=f"a young woman number {i} with blue eyes", n=1 + i % 2, seed=100 + i,
                                     steps=4)
        return httpx.post(server.url + "/v1/images/generations", json=b, headers=_auth(), timeout=120)

    before = _batch_rows(server)
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, range(16)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert responses[7].json()["data"][0]["b64_json"] == alone["data"][0]["b64_json"]
    after = _batch_rows(server)
    calls = after["count"] - before["count"]
    rows = after["sum"] - before["sum"]
    assert rows == 1 + sum(1 + i % 2 for i in range(16) if i != 7)
    assert calls < 16, f"16 concurrent requests ran in {calls} engine calls: not batched"


def test_answers_alone_and_batched_agree(server, pipe):
    faces = pipe.generate(["a man with glasses", "a woman with a hat", "a bald old man"], steps=4, seed=3)
    questions = ["is he wearing glasses?", "what colour are her eyes?", "how old is he?"]

    def ask(i):
        return httpx.post(server.url + "/v1/chat/completions", headers=_auth(), timeout=120, json={"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(_png(faces[i % 3]))}},
                                         {"type": "text", "text": questions[i % 3]}]}]})

    alone = [ask(i).json()["choices"][0]["message"]["content"] for i in range(3)]
    with ThreadPoolExecutor(9) as pool:
        together = [r.json()["choices"][0]["message"]["content"] for r in pool.map(ask, range(9))]
    assert together == alone * 3


def _batch_rows(server) -> dict:
    out = {"count": 0.0, "sum": 0.0}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith('fastface_batch_rows_count{task="images"}'):
            out["count"] = float(line.split()[-1])
        if line.startswith('fastface_batch_rows_sum{task="images"}'):
            out["sum"] = float(line.split()[-1])
    return out


# ------------------------------------------------------------------------------------------------ errors
def _post(server, path, body, headers=None, **kw):
    return httpx.post(server.url + path, json=body, headers=_auth() if headers is None else headers, timeout=60, **kw)


def _is_error(response, status, param=None):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("body,param", [
    ({"prompt": "a man", "n": 5}, "n"),
    ({"prompt": "a man", "n": 0}, "n"),
    ({"prompt": "a man", "steps": 17}, "steps"),
    ({"prompt": "a man", "steps": 0}, "steps"),
    ({"prompt": "a man", "guidance": 1e9}, "guidance"),
    ({"prompt": "a man", "seed": -1}, "seed"),
    ({"prompt": "a man", "size": "1024x1024"}, "size"),
    ({"prompt": "a man", "response_format": "url"}, "response_format"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "word " * 500}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"n": 1}, "prompt"),
    ({"prompt": "a man", "wings": 2}, "wings"),
    ({"prompt": "a man", "kv_refresh": 0}, "kv_refresh"),
    ({"prompt": "a man", "uncond_refresh": 17}, "uncond_refresh"),
    ({"prompt": "a man", "guidance_steps": -1}, "guidance_steps"),
    ({"prompt": 7}, "prompt"),
])
def test_image_request_errors_name_the_field(server, body, param):
    _is_error(_post(server, "/v1/images/generations", body), 422, param)


def test_kv_refresh_on_a_reference_server_is_422():
    live = LiveServer(create_app(fastface.load(backend="reference"), ServerSettings(api_key=KEY)))
    try:
        err = _is_error(_post(live, "/v1/images/generations", {"prompt": "a man", "steps": 2, "kv_refresh": 2}), 422,
                        "kv_refresh")
        assert "reference loop" in err["message"]
    finally:
        live.stop()


def test_unknown_model_is_404(server):
    _is_error(_post(server, "/v1/images/generations", {"prompt": "a man", "model": "dall-e-3"}), 404, "model")


def _chat(url=None, text="what colour is her hair?", **extra):
    content = [{"type": "text", "text": text}]
    if url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {"messages": [{"role": "user", "content": content}], **extra}


@pytest.mark.parametrize("url", [
    "https://example.com/face.png",
    "data:image/png;base64,!!!!",
    _data_url(b"not an image at all"),
    _data_url(_png(Image.new("RGB", (9000, 10)))),
])
def test_bad_images_are_400(server, url):
    _is_error(_post(server, "/v1/chat/completions", _chat(url)), 400, "messages.image_url.url")


def test_chat_request_errors(server, pipe):
    url = _data_url(_png(Image.new("RGB", (64, 64), (120, 90, 60))))
    _is_error(_post(server, "/v1/chat/completions", _chat(None)), 422, "messages.content.image_url")
    _is_error(_post(server, "/v1/chat/completions", _chat(url, text="")), 422, "messages.content.text")
    _is_error(_post(server, "/v1/chat/completions", _chat(url, max_tokens=10**6)), 422, "max_tokens")
    _is_error(_post(server, "/v1/chat/completions", _chat(url, stream=True)), 422, "stream")
    _is_error(_post(server, "/v1/chat/completions", {"messages": []}), 422, "messages")
    _is_error(_post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}), 422,
              "messages.content")


def test_body_size_bound_is_413(server):
    big = _data_url(b"\0" * (300 * 1024))
    _is_error(_post(server, "/v1/chat/completions", _chat(big)), 413)

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * 8192
        yield b'"}'

    r = httpx.post(server.url + "/v1/images/generations", content=chunks(), timeout=60,
                   headers={**_auth(), "Content-Type": "application/json"})
    _is_error(r, 413)


def test_not_json_and_unknown_routes(server):
    r = httpx.post(server.url + "/v1/images/generations", content=b"{not json", timeout=60,
                   headers={**_auth(), "Content-Type": "application/json"})
    _is_error(r, 422)
    _is_error(httpx.get(server.url + "/v1/nothing-here", headers=_auth()), 404)


def test_api_key_is_required(server):
    body = {"prompt": "a man", "steps": 1}
    _is_error(_post(server, "/v1/images/generations", body, headers={}), 401)
    _is_error(_post(server, "/v1/images/generations", body, headers={"Authorization": "Bearer wrong"}), 401)
    _is_error(_post(server, "/v1/images/generations", body, headers={"Authorization": KEY}), 401)
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key


def test_overload_is_429_and_the_server_survives(pipe):
    live = LiveServer(create_app(pipe, ServerSettings(max_batch=1, max_wait_ms=0, max_queue=2, max_steps=16)))
    try:
        def post(i):
            return httpx.post(live.url + "/v1/images/generations", timeout=120,
                              json={"prompt": "a man", "seed": i, "steps": 8})

        with ThreadPoolExecutor(12) as pool:
            codes = [r.status_code for r in pool.map(post, range(12))]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
        assert post(0).status_code == 200  # and it still serves
    finally:
        live.stop()


def test_graceful_shutdown_finishes_requests_in_flight(pipe):
    live = LiveServer(create_app(pipe, ServerSettings(max_batch=4, max_wait_ms=0, max_steps=16)))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(httpx.post, live.url + "/v1/images/generations", timeout=120,
                               json={"prompt": "a woman", "seed": i, "steps": 16}) for i in range(4)]
        time.sleep(0.5)  # all four are in flight
        live.stop()
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 4
    assert all(len(r.json()["data"]) == 1 for r in responses)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_batch"):
        ServerSettings(max_batch=0)
    with pytest.raises(ValueError, match="api_key"):
        ServerSettings(api_key="")


def test_cli_serve_help_and_bad_port(capsys):
    from fastface.cli import main

    assert main(["serve", "--port", "70000"]) != 0
    err = capsys.readouterr().err
    assert "port" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "127.0.0.1" in capsys.readouterr().out


def test_responses_are_json(server):
    r = _post(server, "/v1/images/generations", {"prompt": "a man", "steps": 1, "seed": 0})
    assert r.headers["content-type"].startswith("application/json")
    json.loads(r.text)


def test_an_int8_server_draws_what_the_int8_library_draws():
    pipe8 = fastface.load(weights="int8")
    live = LiveServer(create_app(pipe8, ServerSettings(max_batch=4, max_wait_ms=10, max_steps=8)))
    try:
        r = httpx.post(live.url + "/v1/images/generations", json={"prompt": "a bald man", "seed": 3, "steps": 3},
                       timeout=120)
    finally:
        live.stop()
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    want = pipe8.generate(["a bald man"], steps=3, seed=3)[0]
    assert np.array_equal(np.asarray(got), np.asarray(want))
