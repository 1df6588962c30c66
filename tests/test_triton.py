"""``dyvte triton-repo``: the repository it writes, the python-backend model's logic, and a real
``tritonserver`` (from the nvidia-pytriton wheel in ``.venv/triton``, made by
``scripts/setup.sh --triton``) queried with ``tritonclient`` over HTTP and gRPC.

Without that environment the server test skips with the reason; where it exists (the README's
test command and CI make it), or with DYVTE_REQUIRE_TRITON=1, a server that cannot run fails.
"""

import io
import json
import os
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["what color ?", "how many red squares are there ?", "is there a blue triangle ?", "what shape ?"]


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_triton_repo_files(llama, tmp_path):
    from click.testing import CliRunner

    from dyvte.cli import main

    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "activate").write_text("")
    repo = tmp_path / "repo"
    args = ["triton-repo", "--engine-dir", str(llama.engine_dir), "--out", str(repo), "--model-name", "llava-tiny",
            "--instances", "2", "--max-batch", "4", "--env", str(env), "--policy", "gate", "--prune", "fastv:2:0.5",
            "--kv-budget", "1GiB", "--prefill-tokens", "512"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    cfg = (repo / "llava-tiny" / "config.pbtxt").read_text()
    for line in ('name: "llava-tiny"', 'backend: "python"', "max_batch_size: 4", "max_queue_delay_microseconds: 5000",
                 "count: 2", "kind: KIND_CPU", 'name: "IMAGE"', "data_type: TYPE_UINT8", "allow_ragged_batch: true",
                 'name: "PROMPT"', "data_type: TYPE_STRING", 'name: "TEXT"', 'name: "EXIT_LAYER"', "TYPE_INT32",
                 'name: "TIMINGS"', 'key: "EXECUTION_ENV_PATH"', f'string_value: "{env.resolve()}"',
                 f'string_value: "{Path(llama.engine_dir).resolve()}"', 'string_value: "gate"', 'name: "PRUNE"',
                 'key: "PRUNE"\n  value: { string_value: "fastv:2:0.5" }',
                 f'key: "KV_BUDGET"\n  value: {{ string_value: "{2**30}" }}',
                 'key: "PREFILL_TOKENS"\n  value: { string_value: "512" }'):
        assert line in cfg, line
    from importlib.resources import files

    assert (repo / "llava-tiny" / "1" / "model.py").read_text() == \
        (files("dyvte.serving") / "assets" / "model.py").read_text()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "--overwrite" in r.stderr
    r = CliRunner().invoke(main, [*args, "--overwrite", "--copy-engine", "--kind", "gpu", "--backend", "torch"])
    assert r.exit_code == 0, r.output
    cfg = (repo / "llava-tiny" / "config.pbtxt").read_text()
    assert "kind: KIND_GPU" in cfg and 'key: "ENGINE_DIR"\n  value: { string_value: "engine" }' in cfg
    assert (repo / "llava-tiny" / "1" / "engine" / "manifest.json").is_file()
    for bad, msg in ((["--kind", "gpu", "--backend", "onnxruntime"], "KIND_GPU"), (["--max-batch", "99"], "max batch"),
                     (["--backend", "tensorrt"], "GPU"), (["--policy", "layer:77"], "layer:77"),
                     (["--env", str(tmp_path)], "bin/activate"), (["--prune", "fastv:9:0.5"], "--prune"),
                     (["--kv-budget", "lots"], "not a size")):
        r = CliRunner().invoke(main, [*args, "--overwrite", *bad])
        code = 2 if bad[0] == "--kv-budget" else 1  # click's usage error for a value it cannot parse
        assert r.exit_code == code and msg in r.stderr and "Traceback" not in r.output, (bad, r.output)


def test_instance_backend():
    from dyvte.errors import InputError
    from dyvte.serving.triton import instance_backend

    assert instance_backend("auto", "CPU", 0) == ("onnxruntime", {})
    assert instance_backend("auto", "CPU", 0, "bfloat16") == ("torch", {"device": "cpu"})
    assert instance_backend("torch", "GPU", 3) == ("torch", {"device": "cuda:3"})
    assert instance_backend("auto", "GPU", 2) == ("torch", {"device": "cuda:2"})  # no finished TensorRT build
    assert instance_backend("tensorrt", "GPU", 1) == ("tensorrt", {"device": "cuda:1"})
    with pytest.raises(InputError):
        instance_backend("onnxruntime", "GPU", 0)


def test_triton_model_answers_a_batch_from_its_worker(llama, pipelines):
    """The python-backend model's logic: Triton's batch (several requests, rows) is queued at
    once and prefilled together; bad requests get their own error; PRUNE per request."""
    from dyvte.errors import InputError
    from dyvte.serving.triton import TritonModel

    pipe = pipelines(llama.engine_dir)
    model = TritonModel(pipe, policy="gate", prune="divprune:0.5")
    try:
        a, b = png(make_image(0)), png(make_image(1))
        n = max(len(a), len(b))
        two = np.stack([np.frombuffer(x + bytes(n - len(x)), np.uint8) for x in (a, b)])  # padded rows
        requests = [
            {"PROMPT": np.array([[QUESTIONS[0].encode()], [QUESTIONS[1].encode()]], dtype=object), "IMAGE": two,
             "MAX_TOKENS": np.array([[3], [6]], np.int32), "PRUNE": np.array([[b""], [b"fastv:2:0.5"]], dtype=object)},
            {"PROMPT": np.array([[b"what shape ?"]], dtype=object), "IMAGE": np.frombuffer(b"junk" * 30, np.uint8)[None]},
            {"PROMPT": np.array([[QUESTIONS[2].encode()]], dtype=object), "PRUNE": np.array([[b"none"]], dtype=object)},
            {"PROMPT": np.array([[QUESTIONS[3].encode()]], dtype=object), "IMAGE": np.frombuffer(a, np.uint8)[None],
             "MAX_TOKENS": np.array([[99]], np.int32)},  # over the folder's limit
            {"PROMPT": np.array([[QUESTIONS[3].encode()]], dtype=object), "PRUNE": np.array([[b"fastv:9:0.5"]], dtype=object)},
        ]
        out = model.execute(requests, timeout=60)
        assert isinstance(out[1], InputError) and isinstance(out[3], InputError) and "max_tokens" in str(out[3])
        assert isinstance(out[4], InputError) and str(out[4]).startswith("PRUNE:")
        want = [pipe.generate(make_image(0), QUESTIONS[0], 3, "gate", prune="divprune:0.5"),
                pipe.generate(make_image(1), QUESTIONS[1], 6, "gate", prune="fastv:2:0.5")]
        assert out[0]["TEXT"].shape == (2, 1) and out[0]["EXIT_LAYER"].dtype == np.int32
        assert [t[0].decode() for t in out[0]["TEXT"]] == [w.text for w in want]
        assert out[0]["EXIT_LAYER"][:, 0].tolist() == [w.exit_layer for w in want]
        info = [json.loads(x[0]) for x in out[0]["DYVTE"]]
        assert [i["prune"] for i in info] == ["divprune:0.5", "fastv:2:0.5"]
        assert info[0]["batch_size"] == 3 and info[0]["policy"] == "gate" and info[0]["num_layers"] == llama.spec.num_layers
        assert "prefill_s" in json.loads(out[0]["TIMINGS"][1, 0])
        text_only = pipe.run([pipe.encode_chat([{"role": "user", "content": QUESTIONS[2]}])], "gate")[0]
        assert out[2]["TEXT"][0, 0].decode() == text_only.text and out[2]["EXIT_LAYER"][0, 0] == llama.spec.num_layers
        assert json.loads(out[2]["DYVTE"][0, 0])["prune"] is None
    finally:
        model.worker.close()  # the pipeline is the test session's


def test_triton_model_loads_from_config_args(llama, tmp_path):
    from dyvte.serving.triton import TritonModel, TritonRepoSettings, write_triton_repo

    model_dir = write_triton_repo(TritonRepoSettings(llama.engine_dir, tmp_path / "repo", copy_engine=True,
                                                     policy="never"))
    cfg = {"max_batch_size": 8, "parameters": {"ENGINE_DIR": {"string_value": "engine"},
                                               "BACKEND": {"string_value": "auto"},
                                               "POLICY": {"string_value": "never"}}}
    args = {"model_config": json.dumps(cfg), "model_repository": str(model_dir), "model_version": "1",
            "model_instance_kind": "CPU", "model_instance_device_id": "0"}
    m = TritonModel.from_triton_args(args)
    try:
        assert m.pipe.backend == "onnxruntime" and m.policy == "never"
        out = m.execute([{"PROMPT": np.array([[b"what color ?"]], dtype=object),
                          "IMAGE": np.frombuffer(png(make_image(0)), np.uint8)[None]}])[0]
        assert out["EXIT_LAYER"][0, 0] == llama.spec.num_layers
    finally:
        m.close()
    cfg["max_batch_size"] = 64
    with pytest.raises(Exception, match="max_batch_size"):
        TritonModel.from_triton_args({**args, "model_config": json.dumps(cfg)})


# -- a real tritonserver -----------------------------------------------------------------------
def _unavailable(reason: str):
    env = Path(os.environ.get("DYVTE_TRITON_ENV", ROOT / ".venv" / "triton"))
    if os.environ.get("DYVTE_REQUIRE_TRITON") == "1" or (env / "bin" / "python").exists():
        pytest.fail(f"Triton is required here ({env} was set up for it) but: {reason}")
    pytest.skip(reason)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _local_tritonserver(env: Path, workdir: Path) -> tuple[Path, Path, dict]:
    """(tritonserver binary, backend directory, environment) of the nvidia-pytriton wheel
    installed in ``env``: its python backend with the stub for env's Python copied in, and the
    wheel's bundled libraries (and env's libpython) on LD_LIBRARY_PATH."""
    code = ("import importlib.util, sys, sysconfig; s = importlib.util.find_spec('pytriton');"
            "print(s.submodule_search_locations[0] if s else ''); print('%d.%d' % sys.version_info[:2]);"
            "print(sysconfig.get_config_var('LIBDIR') or '')")
    pkg, version, libdir = subprocess.run([str(env / "bin" / "python"), "-c", code], capture_output=True, text=True,
                                          check=True).stdout.splitlines()
    if not pkg:
        _unavailable(f"nvidia-pytriton is not installed in {env}; run scripts/setup.sh --triton")
    server = Path(pkg) / "tritonserver"
    binary, stub = server / "bin" / "tritonserver", server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.is_file() or not stub.is_file():
        _unavailable(f"the nvidia-pytriton wheel in {env} has no tritonserver or stub for Python {version}")
    backends = workdir / "backends"
    shutil.copytree(server / "backends" / "python", backends / "python")
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    libs = [str(Path(pkg).parent / "nvidia_pytriton.libs"), libdir, os.environ.get("LD_LIBRARY_PATH", "")]
    return binary, backends, {**os.environ, "LD_LIBRARY_PATH": ":".join(p for p in libs if p)}


@pytest.fixture(scope="module")
def triton(llama, tmp_path_factory):
    """A tritonserver on 127.0.0.1 serving the tiny Llama folder: (http url, grpc url, model name)."""
    from dyvte.serving.triton import TritonRepoSettings, write_triton_repo

    env = Path(os.environ.get("DYVTE_TRITON_ENV", ROOT / ".venv" / "triton"))
    if not (env / "bin" / "python").exists():
        _unavailable(f"no Triton environment at {env}; make it with scripts/setup.sh --triton")
    work = tmp_path_factory.mktemp("triton")
    binary, backends, proc_env = _local_tritonserver(env, work)
    write_triton_repo(TritonRepoSettings(llama.engine_dir, work / "repo", model_name="dyvte", backend="onnxruntime",
                                         env=env, max_queue_delay_us=20_000, policy="gate"))
    http_port, grpc_port, metrics_port = _free_ports(3)
    log = open(work / "tritonserver.log", "w")
    proc = subprocess.Popen([str(binary), "--model-repository", str(work / "repo"), "--backend-directory", str(backends),
                             "--http-address", "127.0.0.1", "--http-port", str(http_port),
                             "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port),
                             "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics_port),
                             "--exit-timeout-secs", "10"], stdout=log, stderr=subprocess.STDOUT, env=proc_env)
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
    t_end = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                _unavailable(f"tritonserver exited ({proc.returncode}): "
                             f"{(work / 'tritonserver.log').read_text()[-3000:]}")
            try:
                if client.is_server_ready() and client.is_model_ready("dyvte"):
                    break
            except Exception:
                pass
            if time.monotonic() > t_end:
                _unavailable(f"tritonserver not ready in 240 s: {(work / 'tritonserver.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", "dyvte"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _inputs(module, prompt: str, image: bytes | None, max_tokens: int | None, prune: str | None = None):
    inputs = [module.InferInput("PROMPT", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
    if prune is not None:
        inputs.append(module.InferInput("PRUNE", [1, 1], "BYTES"))
        inputs[-1].set_data_from_numpy(np.array([[prune.encode()]], dtype=object))
    if image is not None:
        inputs.append(module.InferInput("IMAGE", [1, len(image)], "UINT8"))
        inputs[-1].set_data_from_numpy(np.frombuffer(image, np.uint8)[None])
    if max_tokens is not None:
        inputs.append(module.InferInput("MAX_TOKENS", [1, 1], "INT32"))
        inputs[-1].set_data_from_numpy(np.array([[max_tokens]], np.int32))
    return inputs


def _answer(result) -> tuple[str, int, dict]:
    return (result.as_numpy("TEXT")[0, 0].decode(), int(result.as_numpy("EXIT_LAYER")[0, 0]),
            json.loads(result.as_numpy("DYVTE")[0, 0]))


def test_tritonserver_http_and_grpc_answer_as_the_pipeline(triton, llama, pipelines):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    http_url, grpc_url, name = triton
    pipe = pipelines(llama.engine_dir)
    cases = [(QUESTIONS[i], make_image(30 + i), 2 + 2 * i) for i in range(4)]
    want = [pipe.generate(img, q, n, "gate") for q, img, n in cases]
    text_only = pipe.run([pipe.encode_chat([{"role": "user", "content": QUESTIONS[0]}], 5)], "gate")[0]

    http = httpclient.InferenceServerClient(http_url, concurrency=len(cases))
    cfg = http.get_model_config(name)
    assert cfg["backend"] == "python" and "dynamic_batching" in cfg and cfg["instance_group"][0]["kind"] == "KIND_CPU"
    # sent together: Triton's dynamic batcher groups them, the model runs each group as one batch
    pending = [http.async_infer(name, _inputs(httpclient, q, png(img), n)) for q, img, n in cases]
    got = [_answer(p.get_result()) for p in pending]
    assert [(t, e) for t, e, _ in got] == [(w.text, w.exit_layer) for w in want]
    assert max(info["batch_size"] for _, _, info in got) > 1
    assert all(info["policy"] == "gate" for _, _, info in got)
    t, e, _ = _answer(http.infer(name, _inputs(httpclient, QUESTIONS[0], None, 5)))
    assert (t, e) == (text_only.text, text_only.exit_layer)

    grpc = grpcclient.InferenceServerClient(grpc_url)
    with ThreadPoolExecutor(len(cases)) as ex:
        got = list(ex.map(lambda c: _answer(grpc.infer(name, _inputs(grpcclient, c[0], png(c[1]), c[2]))), cases))
    assert [(t, e) for t, e, _ in got] == [(w.text, w.exit_layer) for w in want]
    assert json.loads(grpc.infer(name, _inputs(grpcclient, *cases[0][:1], png(cases[0][1]), 2))
                      .as_numpy("TIMINGS")[0, 0])["prefill_s"] > 0

    for client, module in ((http, httpclient), (grpc, grpcclient)):  # bad requests: an error, the server stays up
        with pytest.raises(InferenceServerException, match="cannot be decoded"):
            client.infer(name, _inputs(module, QUESTIONS[0], b"not an image" * 10, 2))
        with pytest.raises(InferenceServerException, match="max_tokens"):
            client.infer(name, _inputs(module, QUESTIONS[0], png(make_image(0)), 999))
    assert _answer(grpc.infer(name, _inputs(grpcclient, *cases[1][:1], png(cases[1][1]), cases[1][2])))[0] == want[1].text


def test_tritonserver_requests_join_the_running_batch(triton, llama, pipelines):
    """Through the real server: short requests sent while long ones decode join their batch and
    are answered first (execute returns at once; the worker answers through response senders);
    PRUNE per request; a client that gives up does not disturb the others."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    http_url, grpc_url, name = triton
    pipe = pipelines(llama.engine_dir)
    longs = [(QUESTIONS[i], make_image(40 + i), 32) for i in range(3)]
    shorts = [(QUESTIONS[3], make_image(50 + i), 2) for i in range(2)]
    want = {id(c): pipe.generate(c[1], c[0], c[2], "gate") for c in longs + shorts}
    assert all(len(want[id(c)].token_ids) == 32 for c in longs)  # random weights: no early EOS
    http = httpclient.InferenceServerClient(http_url, concurrency=8)
    done = {}

    def ask(case):
        q, img, n = case
        res = _answer(httpclient.InferenceServerClient(http_url).infer(name, _inputs(httpclient, q, png(img), n)))
        done[id(case)] = time.monotonic()
        return res

    with ThreadPoolExecutor(len(longs) + len(shorts)) as ex:
        pending = [ex.submit(ask, c) for c in longs]
        time.sleep(0.02)  # the long ones have arrived (32 steps: they decode for much longer than this)
        pending += [ex.submit(ask, c) for c in shorts]
        got = [p.result() for p in pending]
    for (text, exit_layer, info), case in zip(got, longs + shorts):
        assert (text, exit_layer) == (want[id(case)].text, want[id(case)].exit_layer)
    assert max(done[id(c)] for c in shorts) < min(done[id(c)] for c in longs)  # answered first
    assert all(info["batch_size"] >= 2 for _, _, info in got[len(longs):])  # decoded with the long ones

    spec = "divprune:0.5"
    t, e, info = _answer(http.infer(name, _inputs(httpclient, QUESTIONS[1], png(make_image(5)), 4, spec)))
    w = pipe.generate(make_image(5), QUESTIONS[1], 4, "gate", prune=spec)
    assert (t, e, info["prune"]) == (w.text, w.exit_layer, spec)
    with pytest.raises(InferenceServerException, match="PRUNE"):
        http.infer(name, _inputs(httpclient, QUESTIONS[1], png(make_image(5)), 4, "fastv:99:0.5"))

    grpc = grpcclient.InferenceServerClient(grpc_url)
    with pytest.raises(InferenceServerException):  # gives up after 1 ms: the server cancels or finishes it
        grpc.infer(name, _inputs(grpcclient, *longs[0][:1], png(longs[0][1]), 32), client_timeout=0.001)
    assert _answer(grpc.infer(name, _inputs(grpcclient, shorts[0][0], png(shorts[0][1]), 2)))[0] == \
        want[id(shorts[0])].text
