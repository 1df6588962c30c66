"""The torch backend against ONNX Runtime on the same engine folder (CPU in CI; CUDA when present)."""

import numpy as np
import pytest
import torch

from conftest import make_image

PROMPTS = ["what color is the circle ?", "how many red squares are there ?", "is there a blue triangle ?"]


@pytest.fixture(scope="module")
def torch_pipes():
    from dyvte.runtime import Pipeline

    cache = {}

    def get(engine_dir, **kw):
        key = (str(engine_dir), tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = Pipeline.load(engine_dir, backend="torch", **kw)
        return cache[key]

    return get


def _compare(a, b, atol=1e-4):
    assert a.exit_layer == b.exit_layer
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(a.logits, b.logits, atol=atol, rtol=0)


@pytest.mark.parametrize("policy", ["never", "layer:0", "layer:2", "gate"])
def test_matches_onnxruntime(tiny, pipelines, torch_pipes, policy):
    ort, pt = pipelines(tiny.engine_dir), torch_pipes(tiny.engine_dir, device="cpu")
    if policy == "layer:2" and 2 not in tiny.candidates:
        policy = f"layer:{tiny.candidates[0]}"
    for seed, prompt in enumerate(PROMPTS[:2]):
        kw = dict(max_new_tokens=6, policy=policy, return_logits=True)
        _compare(pt.generate(make_image(seed), prompt, **kw), ort.generate(make_image(seed), prompt, **kw))


def test_batch_with_mixed_exits_matches(llama, pipelines, torch_pipes):
    ort, pt = pipelines(llama.engine_dir), torch_pipes(llama.engine_dir, device="cpu")
    images = [make_image(s) for s in range(3)]
    for thr in (0.2, 0.5, 0.8):
        a = pt.generate(images, PROMPTS, max_new_tokens=4, policy="gate", gate_threshold=thr, return_logits=True)
        b = ort.generate(images, PROMPTS, max_new_tokens=4, policy="gate", gate_threshold=thr, return_logits=True)
        for x, y in zip(a, b):
            _compare(x, y)


def test_low_precision_on_cpu(llama, pipelines, torch_pipes):
    """bfloat16 runs and stays close to float32 (tokens may differ on near-ties)."""
    ref = pipelines(llama.engine_dir).generate(make_image(0), PROMPTS[0], max_new_tokens=1, policy="never",
                                              return_logits=True)
    pt = torch_pipes(llama.engine_dir, device="cpu", dtype="bfloat16")
    res = pt.generate(make_image(0), PROMPTS[0], max_new_tokens=3, policy="layer:2", return_logits=True)
    assert res.logits.dtype == np.float32 and np.isfinite(res.logits).all()
    res = pt.generate(make_image(0), PROMPTS[0], max_new_tokens=1, policy="never", return_logits=True)
    assert np.abs(res.logits - ref.logits).max() < 0.05 * np.abs(ref.logits).max() + 0.05


def test_bad_dtype(llama):
    from dyvte.errors import InputError
    from dyvte.runtime import Pipeline

    with pytest.raises(InputError, match="dtype"):
        Pipeline.load(llama.engine_dir, backend="torch", device="cpu", dtype="int8")


def test_unknown_backend(llama):
    from dyvte.errors import BackendUnavailableError
    from dyvte.runtime import Pipeline

    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        Pipeline.load(llama.engine_dir, backend="tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_matches_onnxruntime(tiny, pipelines, graphs):
    from dyvte.runtime import Pipeline

    pt = Pipeline.load(tiny.engine_dir, backend="torch", device="cuda", cuda_graphs=graphs)
    ort = pipelines(tiny.engine_dir)
    for policy in ("never", "gate", f"layer:{tiny.candidates[0]}"):
        kw = dict(max_new_tokens=8, policy=policy, return_logits=True)
        _compare(pt.generate(make_image(1), PROMPTS[1], **kw), ort.generate(make_image(1), PROMPTS[1], **kw), atol=2e-3)
    batch = pt.generate([make_image(s) for s in range(3)], PROMPTS, max_new_tokens=5, policy="gate", return_logits=True)
    alone = [ort.generate(make_image(s), p, max_new_tokens=5, policy="gate", return_logits=True) for s, p in enumerate(PROMPTS)]
    for x, y in zip(batch, alone):
        _compare(x, y, atol=2e-3)


def test_reused_caches_match_fresh_ones(llama, pipelines, torch_pipes):
    """Pooled caches (what CUDA graphs replay on) give the same answers across requests of
    different lengths, batch sizes and exits as fresh caches."""
    ort, pt = pipelines(llama.engine_dir), torch_pipes(llama.engine_dir, device="cpu", reuse_caches=True)
    allocated = []
    for _ in range(2):
        for seed, prompt in enumerate(PROMPTS):
            for policy in ("gate", "never", "layer:1"):
                kw = dict(max_new_tokens=5, policy=policy, return_logits=True)
                _compare(pt.generate(make_image(seed), prompt, **kw), ort.generate(make_image(seed), prompt, **kw))
        images = [make_image(s) for s in range(3)]
        for x, y in zip(pt.generate(images, PROMPTS, max_new_tokens=4, policy="gate", return_logits=True),
                        ort.generate(images, PROMPTS, max_new_tokens=4, policy="gate", return_logits=True)):
            _compare(x, y)
        allocated.append(pt.runner.cache_allocations)
    assert allocated[0] > 0 and allocated[1] == allocated[0]  # the second round reuses every bucket
    pooled = [c for bucket in pt.runner._pool.values() for c in bucket]
    assert len(pooled) == allocated[0] and not any(c.in_use for c in pooled)  # every cache pooled and released


def test_cache_pool_stays_within_its_byte_budget(llama, pipelines, torch_pipes):
    """Idle pooled caches are freed (least recently used first) beyond the budget; answers unchanged."""
    ort = pipelines(llama.engine_dir)
    one = torch_pipes(llama.engine_dir, device="cpu", reuse_caches=True, cache_pool_bytes=1 << 40)
    one.generate(make_image(0), PROMPTS[0], max_new_tokens=4, policy="never")
    budget = one.runner.pooled_bytes // 3  # a third of one request's caches
    pt = torch_pipes(llama.engine_dir, device="cpu", reuse_caches=True, cache_pool_bytes=budget)
    for seed, n in enumerate((2, 20, 31, 5, 12)):
        kw = dict(max_new_tokens=n, policy="gate", return_logits=True)
        _compare(pt.generate(make_image(seed), PROMPTS[seed % 3], **kw), ort.generate(make_image(seed), PROMPTS[seed % 3], **kw))
        assert not any(c.in_use for bucket in pt.runner._pool.values() for c in bucket)  # released after the request
        assert pt.runner.pooled_bytes <= budget


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_cuda_graphs_captured_once_per_bucket(llama):
    from dyvte.runtime import Pipeline

    pt = Pipeline.load(llama.engine_dir, backend="torch", device="cuda")  # CUDA graphs on, pooled caches
    captures = []
    for _ in range(3):
        for seed, prompt in enumerate(PROMPTS):
            for policy in ("gate", "never", "layer:1"):
                pt.generate(make_image(seed), prompt, max_new_tokens=5, policy=policy)
        captures.append(pt.runner.graph_captures)
    assert captures[0] > 0 and captures[0] == captures[1] == captures[2]  # later requests only replay
    assert captures[0] <= sum(len(b) for b in pt.runner._pool.values())  # at most one graph per pooled cache


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_second_gpu_is_honoured(llama, pipelines):
    from dyvte.runtime import Pipeline

    pt = Pipeline.load(llama.engine_dir, backend="torch", device="cuda:1")
    assert all(p.device == torch.device("cuda", 1) for p in pt.runner.segments[0].parameters())
    kw = dict(max_new_tokens=5, policy="gate", return_logits=True)
    _compare(pt.generate(make_image(0), PROMPTS[0], **kw), pipelines(llama.engine_dir).generate(make_image(0), PROMPTS[0], **kw),
             atol=2e-3)


def test_backend_options(llama):
    from dyvte.errors import InputError
    from dyvte.runtime import Pipeline

    with Pipeline.load(llama.engine_dir, backend="auto", device="cpu", cache_pool_bytes=0) as pipe:  # any backend
        assert pipe.generate(make_image(0), PROMPTS[0], max_new_tokens=2).token_ids
    with pytest.raises(InputError, match="backend onnxruntime takes no option reuse_caches"):
        Pipeline.load(llama.engine_dir, backend="onnxruntime", reuse_caches=True)
