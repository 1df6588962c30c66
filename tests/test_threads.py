"""One Pipeline shared by several threads, on every backend and option: every answer equals the
same request run alone (the contract in runtime/pipeline.py)."""

import threading

import numpy as np
import pytest

from conftest import make_image
from dyvte import features

PROMPTS = ["what color is the circle ?", "how many red squares are there in the picture ?", "is there a blue triangle ?",
           "which shape is on the left of the image ?"]

BACKENDS = [
    ("onnxruntime", {}),
    ("torch", {"device": "cpu"}),
    ("torch", {"device": "cpu", "reuse_caches": True}),  # pooled caches (the default with CUDA graphs)
    ("torch", {"device": "cpu", "reuse_caches": True, "cache_pool_bytes": 0}),  # pool evicting all the time
    pytest.param("torch", {"device": "cuda"}, marks=[pytest.mark.gpu, pytest.mark.skipif(
        not features.has_cuda(), reason="needs a CUDA GPU (none visible)")]),
    pytest.param("tensorrt", {}, marks=[pytest.mark.tensorrt, pytest.mark.skipif(
        not (features.has_tensorrt() and features.has_cuda()), reason="needs TensorRT and a CUDA GPU")]),
]


def _jobs(llama):
    """Mixed requests: policies, lengths, token limits, sampling, single and batched calls."""
    jobs = []
    for i in range(24):
        kw = dict(max_new_tokens=2 + i % 6, policy=["gate", "never", "layer:1", "layer:3"][i % 4],
                  gate_threshold=[0.3, 0.5, 0.7][i % 3], return_logits=True)
        if i % 5 == 4:
            kw.update(temperature=0.8, top_p=0.9, seed=i)
        if i % 6 == 5:  # a batch of three
            jobs.append(([make_image(i + k) for k in range(3)], [PROMPTS[(i + k) % 4] for k in range(3)], kw))
        else:
            jobs.append((make_image(i), PROMPTS[i % 4] + " ?" * (i % 3), kw))
    return jobs


def _in_threads(fn, n: int) -> list[str]:
    """Run fn(0) .. fn(n-1) on n threads started together; the exceptions they raised."""
    errors, barrier = [], threading.Barrier(n)

    def run(i):
        barrier.wait()
        try:
            fn(i)
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _key(results):
    results = results if isinstance(results, list) else [results]
    return [(r.exit_layer, r.token_ids, r.finish_reason) for r in results]


@pytest.mark.parametrize("backend,options", BACKENDS)
def test_shared_pipeline_under_threads(llama, backend, options, tmp_path):
    from dyvte.runtime import Pipeline

    folder = llama.engine_dir
    if backend == "tensorrt":
        from dyvte.engines.tensorrt import BuildSettings, build_engines
        from dyvte.exporter import ExportSettings, export

        folder = export(ExportSettings(out=tmp_path / "fp16", model=str(llama.model_dir), candidates=llama.candidates,
                                       gates=llama.gates_file, dtype="float16", max_input_len=128, max_new_tokens=16,
                                       max_batch=4, progress=False))
        build_engines(BuildSettings(folder, progress=False))
    pipe = Pipeline.load(folder, backend=backend, **options)
    jobs = _jobs(llama)
    alone = [pipe.generate(img, prompt, **kw) for img, prompt, kw in jobs]  # one after another
    got = [None] * len(jobs)

    def worker(w):
        for j in range(w, len(jobs), 6):
            img, prompt, kw = jobs[j]
            got[j] = pipe.generate(img, prompt, **kw)

    errors = _in_threads(worker, 6)
    assert not errors, errors[:3]
    for j, (a, b) in enumerate(zip(got, alone)):
        assert _key(a) == _key(b), j
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            np.testing.assert_allclose(x.logits, y.logits, atol=1e-4 if backend != "tensorrt" else 2e-2, rtol=0)
    pipe.close()


def test_closed_pipeline_refuses_requests(llama):
    from dyvte.errors import InputError
    from dyvte.runtime import Pipeline

    pipe = Pipeline.load(llama.engine_dir, backend="onnxruntime")
    pipe.close()
    pipe.close()  # twice is fine
    with pytest.raises(InputError, match="closed"):
        pipe.generate(make_image(0), PROMPTS[0], max_new_tokens=2)


def test_threads_loading_pipelines(llama):
    """Pipelines created concurrently (the ONNX Runtime thread pool is process-wide) all work."""
    from dyvte.runtime import Pipeline

    out = [None] * 3

    def load(i):
        with Pipeline.load(llama.engine_dir, backend=["onnxruntime", "torch", "onnxruntime"][i]) as p:
            out[i] = p.generate(make_image(0), PROMPTS[0], max_new_tokens=3, policy="never").token_ids

    errors = _in_threads(load, 3)
    assert not errors and out[0] == out[1] == out[2]

