"""``dyvte serve``: OpenAI-compatible answers, in-flight batching, errors, limits, shutdown.

Real uvicorn servers on 127.0.0.1 (random free ports) over the tiny Llama engine folder, queried
with the ``openai`` package (and httpx for what that client cannot send).
"""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import make_image

QUESTIONS = ["what color ?", "how many red squares are there ?", "is there a blue triangle ?", "what shape ?",
             "where is the circle ?", "what is on the left ?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """A uvicorn server in a background thread (no signal handlers)."""

    def __init__(self, pipe, **settings):
        import uvicorn

        from dyvte.serving.server import ServeSettings, create_app

        self.port = free_port()
        self.settings = ServeSettings(pipe.manifest.root, port=self.port, **settings)
        self.app = create_app(pipe, self.settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t_end = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < t_end and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


class SlowPipe:
    """The real pipeline, with each scheduler step delayed (to hold the worker busy
    deterministically); ``added`` records every sequence handed to its schedulers."""

    def __init__(self, pipe, delay: float):
        self._pipe, self._delay, self.added, self.schedulers = pipe, delay, [], []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def scheduler(self, *args, **kwargs):
        sched = self._pipe.scheduler(*args, **kwargs)
        step, add = sched.step, sched.add

        def slow_step():  # admits first, then holds the worker
            finished = step()
            time.sleep(self._delay)
            return finished

        def recording_add(seq):
            self.added.append(seq)
            return add(seq)

        sched.step, sched.add = slow_step, recording_add
        self.schedulers.append(sched)
        return sched


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(img) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def user(question: str, img=None, url: str | None = None) -> list:
    parts = [{"type": "text", "text": question}]
    if img is not None or url is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": url or data_url(img)}})
    return [{"role": "user", "content": parts}]


def alone(pipe, question, img, max_tokens, policy="gate", prune=None, **sampling):
    """The Pipeline's answer to one request run alone."""
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": question}]}]
    return pipe.run([pipe.encode_chat(messages, max_tokens, **sampling)], policy, prune=prune)[0]


@pytest.fixture(scope="module")
def server(llama, pipelines, tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    make_image(5).save(root / "inside.png")
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.png"
    make_image(6).save(outside)
    (root / "link.png").symlink_to(outside)  # a link inside the root to a file outside it
    srv = ServerThread(pipelines(llama.engine_dir), max_wait_ms=100, image_root=root, max_image_bytes=200_000,
                       max_image_pixels=1_000_000, max_body_bytes=2_000_000)
    srv.image_root = root
    yield srv
    srv.stop()


def test_chat_completion_matches_pipeline(server, llama, pipelines):
    pipe = pipelines(llama.engine_dir)
    client = server.client()
    img = make_image(1)
    res = client.chat.completions.create(model=server.app.state.dyvte.model_name, messages=user(QUESTIONS[0], img),
                                         max_tokens=6)
    want = alone(pipe, QUESTIONS[0], img, 6)
    assert res.choices[0].message.content == want.text and res.choices[0].message.role == "assistant"
    assert res.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert res.usage.prompt_tokens == want.prompt_tokens
    assert res.usage.completion_tokens == len(want.token_ids)
    assert res.usage.total_tokens == want.prompt_tokens + len(want.token_ids)
    info = res.dyvte  # the openai client keeps unknown fields
    assert info["exit_layer"] == want.exit_layer and info["num_layers"] == llama.spec.num_layers
    assert info["gate_probs"] == {str(k): v for k, v in want.gate_probs.items()} and info["policy"] == "gate"
    assert info["batch_size"] == 1 and info["backend"] == "onnxruntime"
    assert {"queue_s", "prefill_s", "decode_s", "batch_s", "request_s"} <= set(info["timings"])
    # per-request policy; no model name at all is accepted too
    for policy, exit_layer in (("never", llama.spec.num_layers), ("layer:2", 2)):
        r = client.chat.completions.create(model=server.app.state.dyvte.model_name, messages=user(QUESTIONS[0], img),
                                           max_tokens=4, extra_body={"dyvte": {"policy": policy}})
        assert r.dyvte["exit_layer"] == exit_layer and r.dyvte["policy"] == policy
        assert r.choices[0].message.content == alone(pipe, QUESTIONS[0], img, 4, policy).text
    import httpx

    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": user(QUESTIONS[0], img), "max_tokens": 6})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want.text


def test_streaming_equals_plain_answer(server, llama, pipelines):
    pipe = pipelines(llama.engine_dir)
    client = server.client()
    name = server.app.state.dyvte.model_name
    img = make_image(2)
    plain = client.chat.completions.create(model=name, messages=user(QUESTIONS[1], img), max_tokens=10)
    chunks = list(client.chat.completions.create(model=name, messages=user(QUESTIONS[1], img), max_tokens=10,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content == alone(pipe, QUESTIONS[1], img, 10).text
    assert chunks[0].choices[0].delta.role == "assistant"
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert final[0].dyvte["exit_layer"] == plain.dyvte["exit_layer"]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens and not chunks[-1].choices
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # several deltas


def test_stop_strings(server, llama, pipelines):
    pipe = pipelines(llama.engine_dir)
    client = server.client()
    name = server.app.state.dyvte.model_name
    img = make_image(3)
    full = alone(pipe, QUESTIONS[2], img, 12, policy="never").text
    words = full.split()
    assert len(words) >= 4, full
    stop = words[2]
    want = full[: full.find(stop)].strip()
    for stream in (False, True):
        kw = dict(model=name, messages=user(QUESTIONS[2], img), max_tokens=12, stop=[stop, "zzz-never"],
                  extra_body={"dyvte": {"policy": "never"}})
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert text == want and reason == ["stop"], (text, want)
        else:
            res = client.chat.completions.create(**kw)
            assert res.choices[0].message.content == want and res.choices[0].finish_reason == "stop"
            assert res.usage.completion_tokens < len(alone(pipe, QUESTIONS[2], img, 12, policy="never").token_ids)


def test_concurrent_requests_are_batched_and_answer_as_alone(server, llama, pipelines):
    """Mixed requests sent together run as batches and answer exactly as each one sent alone."""
    client = server.client()
    name = server.app.state.dyvte.model_name
    jobs = [dict(messages=user(q, make_image(10 + i)), max_tokens=2 + 3 * i) for i, q in enumerate(QUESTIONS)]
    jobs[1].update(temperature=1.3, seed=11, top_p=0.9)  # seeded sampling
    jobs[2].update(temperature=0.8, seed=5)
    jobs[3]["messages"] = [{"role": "system", "content": "answer briefly ."}, *jobs[3]["messages"]]
    jobs[4]["messages"] = user("no image here ?")  # text only: never exits
    jobs[5]["stop"] = ["red", "blue"]
    jobs.append(dict(messages=user(QUESTIONS[0], make_image(20)), max_tokens=8, stream=True))

    def send(kw):
        if kw.get("stream"):
            chunks = list(client.chat.completions.create(model=name, **kw))
            final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, final.dyvte
        r = client.chat.completions.create(model=name, **kw)
        return r.choices[0].message.content, r.dyvte

    singles = [send(kw) for kw in jobs]
    assert all(info["batch_size"] == 1 for _, info in singles)
    with ThreadPoolExecutor(len(jobs)) as ex:
        together = list(ex.map(send, jobs))
    assert [t for t, _ in together] == [t for t, _ in singles]
    assert [i["exit_layer"] for _, i in together] == [i["exit_layer"] for _, i in singles]
    assert max(i["batch_size"] for _, i in together) > 1
    assert singles[4][1]["exit_layer"] == llama.spec.num_layers
    pipe = pipelines(llama.engine_dir)
    assert singles[0][0] == alone(pipe, QUESTIONS[0], make_image(10), 2).text
    assert singles[1][0] == alone(pipe, QUESTIONS[1], make_image(11), 5, temperature=1.3, seed=11, top_p=0.9).text


def test_local_paths_only_under_the_image_root(server, llama, pipelines):
    client = server.client()
    name = server.app.state.dyvte.model_name
    want = alone(pipelines(llama.engine_dir), QUESTIONS[0], make_image(5), 5).text
    for url in ("inside.png", str(server.image_root / "inside.png"), f"file://{server.image_root / 'inside.png'}"):
        res = client.chat.completions.create(model=name, messages=user(QUESTIONS[0], url=url), max_tokens=5)
        assert res.choices[0].message.content == want
    import openai

    for url in ("../outside.png", "/etc/hostname", "file:///etc/hostname", "missing.png", "link.png"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=name, messages=user(QUESTIONS[0], url=url))
        assert e.value.body["code"] in ("image_url_not_allowed", "invalid_image_url"), url


def test_models_health_and_metrics(server, llama):
    import httpx

    client = server.client()
    models = client.models.list().data
    assert [m.id for m in models] == [server.app.state.dyvte.model_name]
    assert client.models.retrieve(models[0].id).id == models[0].id
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["backend"] == "onnxruntime"
    client.chat.completions.create(model=models[0].id, messages=user(QUESTIONS[0], make_image(0)), max_tokens=3)
    with pytest.raises(Exception):
        client.chat.completions.create(model=models[0].id, messages=[])
    text = httpx.get(server.url + "/metrics").text
    for metric in ("dyvte_requests_total{status=\"200\"}", "dyvte_requests_total{status=\"400\"}",
                   "dyvte_request_errors_total{code=", "dyvte_request_duration_seconds_bucket",
                   "dyvte_queue_wait_seconds_bucket", "dyvte_prompt_tokens_total", "dyvte_generated_tokens_total",
                   "dyvte_exit_layer_bucket{le=\"0.0\",policy=\"gate\"}", "dyvte_step_tokens_bucket{le=\"1.0\"}",
                   "dyvte_step_duration_seconds_bucket", "dyvte_queue_depth", "dyvte_requests_in_flight",
                   "dyvte_rows{state=\"running\"}", "dyvte_rows{state=\"waiting\"}", "dyvte_rows{state=\"prefilling\"}",
                   "dyvte_kv_cache_bytes{kind=\"held\"}", "dyvte_kv_cache_bytes{kind=\"reserved\"}",
                   "dyvte_kv_cache_bytes{kind=\"budget\"}",
                   "dyvte_time_to_first_token_seconds_bucket"):
        assert metric in text, metric
    generated = [float(line.split()[1]) for line in text.splitlines() if line.startswith("dyvte_generated_tokens_total")]
    assert generated and generated[0] > 0


def _corrupt_png() -> bytes:
    data = png_bytes(make_image(4))
    return data[:40] + bytes(200) + data[240:]


@pytest.mark.parametrize("case", [
    "no_messages", "messages_not_list", "corrupt_image", "truncated_image", "not_an_image", "bad_base64",
    "image_too_many_bytes", "image_too_many_pixels", "remote_url", "prompt_too_long", "max_tokens_over_limit",
    "unknown_model", "n_2", "tools", "bad_temperature", "bad_policy", "tool_role", "unknown_part",
])
def test_bad_requests_get_openai_errors(server, case):
    import numpy as np
    import openai
    from PIL import Image

    client = server.client()
    name = server.app.state.dyvte.model_name
    kw = dict(model=name, messages=user(QUESTIONS[0], make_image(0)))
    noise = Image.fromarray((np.random.RandomState(0).rand(400, 400, 3) * 255).astype("uint8"))
    status, code, param = 400, None, None
    if case == "no_messages":
        kw["messages"], param = [], "messages"
    elif case == "messages_not_list":
        kw["messages"], param = "hello", "messages"
    elif case == "corrupt_image":
        kw["messages"], code = user("q ?", url="data:image/png;base64," + base64.b64encode(_corrupt_png()).decode()), \
            "invalid_image"
    elif case == "truncated_image":
        kw["messages"], code = user("q ?", url="data:image/png;base64," + base64.b64encode(
            png_bytes(make_image(4))[:-60]).decode()), "invalid_image"
    elif case == "not_an_image":
        kw["messages"], code = user("q ?", url="data:image/png;base64," + base64.b64encode(b"hello" * 50).decode()), \
            "invalid_image"
    elif case == "bad_base64":
        kw["messages"], code = user("q ?", url="data:image/png;base64,@@@not-base64@@@"), "invalid_image_url"
    elif case == "image_too_many_bytes":  # 400x400 noise: ~480 KB > the server's 200 KB
        kw["messages"], code = user("q ?", url=data_url(noise)), "image_too_large"
    elif case == "image_too_many_pixels":  # 1200x1000 = 1.2 MP > 1 MP, few bytes
        kw["messages"], code = user("q ?", url=data_url(Image.new("RGB", (1200, 1000)))), "image_too_large"
    elif case == "remote_url":
        kw["messages"], code = user("q ?", url="https://example.com/cat.png"), "image_url_not_allowed"
    elif case == "prompt_too_long":
        kw["messages"], code = user("what color ? " * 200, make_image(0)), "context_length_exceeded"
    elif case == "max_tokens_over_limit":
        kw["max_tokens"], param = 33, "max_tokens"  # the folder's limit is 32
    elif case == "unknown_model":
        kw["model"], status, code = "gpt-4o", 404, "model_not_found"
    elif case == "n_2":
        kw["n"], param = 2, "n"
    elif case == "tools":
        kw["tools"], param = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], "tools"
    elif case == "bad_temperature":
        kw["temperature"], param = -1, "temperature"
    elif case == "bad_policy":
        kw["extra_body"], code = {"dyvte": {"policy": "layer:99"}}, "invalid_policy"
    elif case == "tool_role":
        kw["messages"] = [{"role": "tool", "content": "x", "tool_call_id": "1"}]
    elif case == "unknown_part":
        kw["messages"] = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**kw)
    err = e.value
    assert err.status_code == status, (case, err.body)
    assert set(err.body) == {"message", "type", "param", "code"} and err.body["message"], err.body
    assert err.body["type"] == "invalid_request_error"
    if code:
        assert err.body["code"] == code, err.body
    if param:
        assert err.body["param"] == param, err.body
    ok = client.chat.completions.create(model=name, messages=user(QUESTIONS[0], make_image(0)), max_tokens=2)
    assert ok.choices[0].message.content is not None  # still serving


def test_malformed_http_requests(server):
    import httpx

    url = server.url + "/v1/chat/completions"
    cases = [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_json"),
        (dict(content=b"", headers={"content-type": "application/json"}), 400, "invalid_json"),
        (dict(content=b"\xff\xfe\x00garbage"), 400, "invalid_json"),
        (dict(json=[1, 2, 3]), 400, None),
        (dict(json={"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}), 400, None),
        (dict(content=b"x" * 2_100_000), 413, "request_too_large"),
    ]
    for kwargs, status, code in cases:
        r = httpx.post(url, **kwargs)
        assert r.status_code == status, (kwargs.get("json"), r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        if code:
            assert err["code"] == code
    r = httpx.get(url)
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + "/health").status_code == 200


def test_queue_full_is_503_with_retry_after(llama, pipelines):
    import httpx
    import openai

    srv = ServerThread(SlowPipe(pipelines(llama.engine_dir), 1.0), max_wait_ms=0, max_batch=1, max_queue=1)
    try:
        client = srv.client()
        body = dict(model=srv.app.state.dyvte.model_name, messages=user(QUESTIONS[0], make_image(0)), max_tokens=2)
        with ThreadPoolExecutor(2) as ex:
            first = ex.submit(client.chat.completions.create, **body)
            _wait(lambda: httpx.get(srv.url + "/health").json()["in_flight"] == 1)
            second = ex.submit(client.chat.completions.create, **body)
            _wait(lambda: httpx.get(srv.url + "/health").json()["queue_depth"] == 1)
            with pytest.raises(openai.APIStatusError) as e:
                client.chat.completions.create(**body)
            assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
            assert e.value.body["code"] == "queue_full"
            assert first.result().choices[0].message.content == second.result().choices[0].message.content
    finally:
        srv.stop()


def test_request_timeout_is_504(llama, pipelines):
    import openai

    srv = ServerThread(SlowPipe(pipelines(llama.engine_dir), 1.0), max_wait_ms=0, request_timeout_s=0.4)
    try:
        client = srv.client()
        body = dict(model=srv.app.state.dyvte.model_name, messages=user(QUESTIONS[0], make_image(0)), max_tokens=2)
        for stream in (False, True):
            t0 = time.monotonic()
            with pytest.raises(openai.APIError) as e:
                out = client.chat.completions.create(stream=stream, **body)
                list(out)
            assert time.monotonic() - t0 < 0.9  # answered at the deadline, not when the batch ended
            if not stream:
                assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
            else:
                assert "did not finish" in str(e.value.message)
        srv.app.state.dyvte.settings.request_timeout_s = 30
        assert client.chat.completions.create(**body).choices[0].message.content is not None
    finally:
        srv.stop()


def _wait(cond, timeout=20.0):
    t_end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < t_end, "condition not reached"
        time.sleep(0.02)


def test_text_tracker_streams_only_final_text():
    from dyvte.serving.worker import TextTracker

    words = {1: "hello", 2: "wor", 3: "ld", 4: "STOP", 5: "more"}
    decode = lambda toks: " ".join(words[t] for t in toks).replace("wor ld", "world")  # noqa: E731
    tr = TextTracker(decode, ("STOP",))
    out, stopped = [], False
    for n in range(1, 6):
        delta, stopped = tr.update(list(range(1, n + 1)))
        out.append(delta)
        if stopped:
            break
    assert stopped and n == 4
    text, rest, cut = tr.final(decode([1, 2, 3, 4]))
    assert cut and text == "hello world" and "".join(out) + rest == text
    tr = TextTracker(decode, ("wor", ))
    assert tr.update([1]) == ("hello", False)  # "hello" cannot grow into "wor"
    tr = TextTracker(lambda t: "abc ST", ("STOP",))
    assert tr.update([1]) == ("abc", False)  # "ST" may become STOP: held back


def test_parse_chat_request_options():
    from dyvte.serving.server import RequestError, ServeSettings, parse_chat_request

    s = ServeSettings(Path("."))
    msgs = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    c = parse_chat_request({"messages": msgs, "max_completion_tokens": 5, "stop": "x", "seed": 3, "temperature": 0.5,
                            "top_p": 0.5, "stream": True, "stream_options": {"include_usage": True},
                            "n": 1, "tool_choice": "none", "response_format": {"type": "text"},
                            "dyvte": {"policy": "never", "gate_threshold": 0.7}}, s)
    assert c.messages[0]["role"] == "system" and c.max_tokens == 5 and c.stop == ("x",) and c.seed == 3
    assert (c.temperature, c.top_p, c.stream, c.include_usage, c.policy, c.gate_threshold) == \
        (0.5, 0.5, True, True, "never", 0.7)
    assert parse_chat_request({"messages": msgs}, s).temperature == 0.0  # greedy by default
    for bad, param in [({"stop": ["a"] * 5}, "stop"), ({"seed": "1"}, "seed"), ({"max_tokens": 0}, "max_tokens"),
                       ({"top_p": 0}, "top_p"), ({"logprobs": True}, "logprobs"), ({"presence_penalty": 1}, None),
                       ({"response_format": {"type": "json_object"}}, "response_format"), ({"dyvte": {"x": 1}}, "dyvte")]:
        with pytest.raises(RequestError) as e:
            parse_chat_request({"messages": msgs, **bad}, s)
        assert param is None or e.value.param == param


def test_imports_stay_light_and_cli_help():
    code = (
        "import sys, dyvte.cli, dyvte.serving, dyvte.serving.server, dyvte.serving.worker, dyvte.serving.triton\n"
        "from click.testing import CliRunner\n"
        "from dyvte.cli import main\n"
        "for cmd in ('serve', 'triton-repo'):\n"
        "    r = CliRunner().invoke(main, [cmd, '--help'])\n"
        "    assert r.exit_code == 0 and '--engine-dir' in r.output, r.output\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'transformers', 'fastapi', 'uvicorn', 'starlette',\n"
        "                     'prometheus_client', 'numpy', 'PIL', 'tritonclient') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_serve_cli_errors_are_one_line(tmp_path):
    from click.testing import CliRunner

    from dyvte.cli import main

    r = CliRunner().invoke(main, ["serve", "--engine-dir", str(tmp_path / "nope")])
    assert r.exit_code == 1 and r.stderr.startswith("error:") and "Traceback" not in r.output


def test_graceful_shutdown_finishes_requests_in_flight(llama, pipelines):
    """SIGTERM while a request waits to be prefilled with one still being received: both are
    answered, then the server exits 0."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dyvte.cli", "serve", "--engine-dir", str(llama.engine_dir),
                             "--port", str(port), "--max-wait-ms", "3000", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(healthy, 120)
        images = [make_image(6), make_image(7)]
        bodies = [json.dumps({"messages": user(QUESTIONS[i], images[i]), "max_tokens": 4}).encode() for i in (0, 1)]
        signalled = threading.Event()

        def slow_body():  # request 1 is still being received when SIGTERM comes: request 0 waits for it
            yield bodies[1][:20]
            signalled.wait(30)
            time.sleep(0.3)
            yield bodies[1][20:]

        post = url + "/v1/chat/completions"
        headers = {"content-type": "application/json"}
        with ThreadPoolExecutor(2) as ex:
            second = ex.submit(httpx.post, post, content=slow_body(), headers=headers, timeout=60)
            time.sleep(0.5)  # its headers are read: the server counts it as arriving
            first = ex.submit(httpx.post, post, content=bodies[0], headers=headers, timeout=60)
            _wait(lambda: httpx.get(url + "/health").json()["in_flight"] == 1)  # accepted, waiting for request 1
            proc.send_signal(signal.SIGTERM)
            signalled.set()
            answers = [first.result(), second.result()]
        pipe = pipelines(llama.engine_dir)
        for i, r in enumerate(answers):
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == alone(pipe, QUESTIONS[i], images[i], 4).text
        assert answers[0].json()["dyvte"]["batch_size"] == 2  # prefilled together
        assert proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_load_test_script(server, llama, tmp_path):
    """scripts/load_test.py against a running server, at a small size: every mode, no wrong
    answers, the table and the ratios."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "load_test.py"
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, str(script), "--engine-dir", str(llama.engine_dir), "--url", server.url,
                        "--clients", "3", "--requests", "2", "--serial", "3", "--distinct", "3", "--short-requests", "3",
                        "--long-clients", "2", "--long-tokens", "12", "--rounds", "1", "--policies", "never,gate,layer:2",
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "throughput (concurrent / serial)" in r.stdout and "short p50 (under load / alone)" in r.stdout
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [x["name"] for x in rows] == ["serial", "concurrent", "short alone", "short + 2 long"]
    assert all(x["wrong"] == 0 and x["errors"] == 0 and x["requests"] > 0 for x in rows)
    assert result["long"]["answered"] > 0 and result["long"]["wrong"] == 0
    r = subprocess.run([sys.executable, str(script), "--engine-dir", str(llama.engine_dir), "--url",
                        "http://10.1.2.3:8000"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "loopback" in r.stderr


def test_max_batch_outside_the_folder_limit_is_one_line(llama, pipelines):
    """Checked when the app is made (a one-line error, exit 1), not inside uvicorn's start-up."""
    from dyvte.errors import InputError
    from dyvte.serving.server import ServerState, ServeSettings

    pipe = pipelines(llama.engine_dir)
    for bad in (0, pipe.limits["max_batch"] + 1):
        with pytest.raises(InputError, match=r"--max-batch must be in \[1, \d+\]"):
            ServerState(pipe, ServeSettings(pipe.manifest.root, max_batch=bad))


def test_requests_join_a_running_batch_and_leave_it(llama, pipelines):
    """In-flight batching through HTTP: a short request sent while a long one streams joins its
    batch and is answered long before it; a client that disconnects has its row leave at once."""
    import httpx

    pipe = pipelines(llama.engine_dir)
    long_img, short_img = make_image(3), make_image(8)
    want_long = alone(pipe, QUESTIONS[2], long_img, 32, policy="never")
    assert len(want_long.token_ids) >= 16, want_long  # a long answer (random weights)
    slow = SlowPipe(pipe, 0.03)  # every step takes >= 30 ms: the long answer >= 0.5 s
    srv = ServerThread(slow, max_wait_ms=0)
    try:
        post = srv.url + "/v1/chat/completions"
        long_body = {"messages": user(QUESTIONS[2], long_img), "max_tokens": 32, "stream": True,
                     "dyvte": {"policy": "never"}}
        events, text = [], []
        with httpx.stream("POST", post, json=long_body, timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: ") and '"content": ""' not in line:
                    break  # the long answer is being generated
            short = httpx.post(post, json={"messages": user(QUESTIONS[0], short_img), "max_tokens": 2}, timeout=60)
            events.append("short")
            for line in lines:
                if line.startswith("data: {"):
                    text += [c["delta"].get("content") or "" for c in json.loads(line[6:]).get("choices", [])]
            events.append("long")
        assert events == ["short", "long"] and short.status_code == 200
        assert short.json()["choices"][0]["message"]["content"] == alone(pipe, QUESTIONS[0], short_img, 2).text
        assert short.json()["dyvte"]["batch_size"] == 2  # decoded together with the long one
        long_seq = slow.added[0]
        assert long_seq.finish == want_long.finish_reason and long_seq.tokens == want_long.token_ids

        # a client that goes away mid-stream: its row leaves the batch (cancelled), the rest goes on
        with httpx.stream("POST", post, json=long_body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content": ""' not in line:
                    break
        gone = slow.added[-1]
        _wait(lambda: gone.finish == "cancelled" and not slow.schedulers[0].running, 10)
        assert len(gone.tokens) < len(want_long.token_ids)
        assert gone.tokens == want_long.token_ids[: len(gone.tokens)]
        assert httpx.get(srv.url + "/health").json()["in_flight"] == 0
        after = httpx.post(post, json={"messages": user(QUESTIONS[0], short_img), "max_tokens": 2}, timeout=60)
        assert after.json()["choices"][0]["message"]["content"] == short.json()["choices"][0]["message"]["content"]
    finally:
        srv.stop()


def test_prune_per_request_and_server_default(server, llama, pipelines):
    import openai

    from dyvte.errors import InputError
    from dyvte.serving.server import ServerState, ServeSettings, parse_chat_request

    pipe = pipelines(llama.engine_dir)
    client = server.client()
    name = server.app.state.dyvte.model_name
    img = make_image(9)
    for spec in ("divprune:0.5", "fastv:2:0.6", "divprune:0.3,fastv:1:0.5"):
        r = client.chat.completions.create(model=name, messages=user(QUESTIONS[1], img), max_tokens=6,
                                           extra_body={"dyvte": {"prune": spec, "policy": "never"}})
        want = alone(pipe, QUESTIONS[1], img, 6, "never", prune=spec)
        assert r.choices[0].message.content == want.text and r.dyvte["prune"] == want.prune == spec
    for bad in ("fastv:9:0.5", "divprune:2", "topk:3", 7):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=name, messages=user(QUESTIONS[1], img), max_tokens=2,
                                           extra_body={"dyvte": {"prune": bad}})
        assert e.value.body["param"] == "dyvte.prune" and e.value.body["code"] == "invalid_prune"
        assert "\n" not in e.value.body["message"]
    # the server's default (--prune), which a request may replace or turn off
    state = ServerState(pipe, ServeSettings(pipe.manifest.root, prune="divprune:0.5"))
    s = ServeSettings(pipe.manifest.root)
    msgs = [{"role": "user", "content": "hi"}]
    assert str(state.plan(parse_chat_request({"messages": msgs}, s)).prune) == "divprune:0.5"
    assert state.plan(parse_chat_request({"messages": msgs, "dyvte": {"prune": "none"}}, s)).prune is None
    assert str(state.plan(parse_chat_request({"messages": msgs, "dyvte": {"prune": "fastv:1:0.5"}}, s)).prune) \
        == "fastv:1:0.5"
    with pytest.raises(InputError, match="--prune"):
        ServerState(pipe, ServeSettings(pipe.manifest.root, prune="fastv:99:0.5"))


def test_kv_budget_refuses_what_cannot_fit(llama, pipelines):
    from dyvte.serving.server import RequestError, ServerState, ServeSettings

    pipe = pipelines(llama.engine_dir)
    state = ServerState(pipe, ServeSettings(pipe.manifest.root, kv_budget=20_000))
    state.start()
    try:
        body = {"messages": user(QUESTIONS[0], make_image(0)), "max_tokens": 32}
        with pytest.raises(RequestError) as e:
            state.prepare(json.dumps(body).encode())
        assert e.value.code == "kv_budget_exceeded" and "MiB of KV cache" in str(e.value)
        body["messages"] = user("hi")
        body["max_tokens"] = 2
        _, seq = state.prepare(json.dumps(body).encode())  # a short text prompt fits
        assert state.worker.scheduler.kv_bytes(seq) <= 20_000
    finally:
        state.stop()


def test_worker_survives_a_failing_step(llama, pipelines):
    """A step that raises fails the rows in flight, keeps the waiting ones and the worker."""
    import threading as th

    from dyvte.serving.worker import Job, Worker, make_sequence

    pipe = pipelines(llama.engine_dir)
    fail = th.Event()

    class FailingPipe(SlowPipe):
        def scheduler(self, *args, **kwargs):
            sched = super().scheduler(*args, **kwargs)
            step = sched.step

            def failing_step():  # the step after the one that admitted the first request fails
                if fail.is_set() and sched.running:
                    fail.clear()
                    raise RuntimeError("boom")
                return step()

            sched.step = failing_step
            return sched

    worker = Worker(FailingPipe(pipe, 0.0), max_batch=1)
    try:
        plan = pipe.plan("never")
        outcomes = [[], []]
        done = [th.Event(), th.Event()]
        reqs = [pipe.encode(make_image(i), QUESTIONS[i], 4) for i in (0, 1)]

        def on_done(i):
            return lambda o: (outcomes[i].append(o), done[i].set())

        fail.set()
        worker.submit_many([Job(make_sequence(pipe, r, plan), on_done(i)) for i, r in enumerate(reqs)])
        assert done[0].wait(30) and done[1].wait(30)
        assert isinstance(outcomes[0][0], RuntimeError)  # admitted (max_batch 1) when the step failed
        assert outcomes[1][0].text == alone(pipe, QUESTIONS[1], make_image(1), 4, "never").text  # was waiting
    finally:
        assert worker.close(30)
