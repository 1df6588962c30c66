"""The step-level scheduler (runtime/scheduler.py): requests that join a running batch at any step,
and leave it when they finish or are cancelled, answer exactly as they do alone."""

import numpy as np
import pytest

from conftest import IMAGE_SIZES, make_image

PROMPTS = ["what color is the circle ?", "how many red squares are there in the picture ?", "is there a blue triangle ?"]


def _requests(pipe, n: int):
    """Mixed requests: token limits, policies, thresholds, sampling, one without an image."""
    reqs = []
    for i in range(n):
        image = make_image(i, IMAGE_SIZES[i % len(IMAGE_SIZES)])
        kw = dict(temperature=0.9, top_p=0.8, seed=i) if i % 4 == 3 else {}
        r = pipe.encode(image, PROMPTS[i % 3] + " ?" * (i % 2), max_new_tokens=[3, 9, 1, 6, 12][i % 5], **kw)
        r.policy = ["gate", "never", "layer:1", "layer:3", "layer:0"][i % 5]
        r.gate_threshold = [0.3, 0.5, 0.7][i % 3]
        reqs.append(r)
    return reqs


def _run_staggered(pipe, reqs, arrivals):
    """Drive one scheduler: request i is added before step arrivals[i]; returns results in order."""
    plan = pipe.plan("auto")
    seqs = [pipe.sequence(r, plan, return_logits=True, index=i) for i, r in enumerate(reqs)]
    sched = pipe.scheduler()
    step, sizes = 0, []
    try:
        while not sched.idle or step <= max(arrivals):
            for s, at in zip(seqs, arrivals):
                if at == step:
                    sched.add(s)
            sched.step()
            sizes.append(len(sched.batch))
            step += 1
    finally:
        sched.close()
    return [pipe.result(s) for s in seqs], sizes


BACKENDS = [("onnxruntime", {}), ("torch", {"device": "cpu"}), ("torch", {"device": "cpu", "reuse_caches": True})]


@pytest.mark.parametrize("backend,options", BACKENDS, ids=["onnxruntime", "torch", "torch-pooled"])
@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_vl"])
def test_rows_joining_and_leaving_answer_as_alone(tiny_models, backend, options, name):
    from dyvte.runtime import Pipeline

    model = tiny_models(name)
    with Pipeline.load(model.engine_dir, backend=backend, **options) as pipe:
        reqs = _requests(pipe, 10)
        alone = [pipe.run([r])[0] for r in reqs]
        for r, a in zip(reqs, alone):
            a.logits = pipe.run([r], return_logits=True)[0].logits
        results, sizes = _run_staggered(pipe, reqs, [0, 0, 1, 2, 2, 4, 5, 5, 9, 12])
        assert max(sizes) >= 3  # rows really overlapped
        for i, (got, want) in enumerate(zip(results, alone)):
            assert got.token_ids == want.token_ids, i
            assert got.exit_layer == want.exit_layer and got.finish_reason == want.finish_reason, i
            assert got.gate_probs.keys() == want.gate_probs.keys(), i
            np.testing.assert_allclose(got.logits, want.logits, atol=1e-4, rtol=1e-4, err_msg=str(i))


def test_cancelled_rows_leave_and_the_rest_is_unchanged(llama, pipelines):
    pipe = pipelines(llama.engine_dir)
    reqs = _requests(pipe, 6)
    for r in reqs:
        r.max_new_tokens = 12
        r.sampling = type(r.sampling)()  # greedy: run to the limit
    alone = [pipe.run([r])[0] for r in reqs]
    plan = pipe.plan("auto")
    seqs = [pipe.sequence(r, plan, index=i) for i, r in enumerate(reqs)]
    sched = pipe.scheduler()
    for s in seqs:
        sched.add(s)
    for step in range(20):
        if step == 3:
            sched.cancel(seqs[1])
            sched.cancel(seqs[4])
        sched.step()
        if step == 4:
            assert len(sched.batch) == sum(1 for i, s in enumerate(seqs) if i not in (1, 4) and not s.done)
    sched.close()
    for i, (s, a) in enumerate(zip(seqs, alone)):
        if i in (1, 4):
            assert s.finish == "cancelled" and s.tokens == a.token_ids[: len(s.tokens)]
        else:
            assert s.tokens == a.token_ids, i


def test_caches_are_released(llama):
    """Pooled torch caches go back to the pool when rows leave: nothing stays in use."""
    from dyvte.runtime import Pipeline

    with Pipeline.load(llama.engine_dir, backend="torch", device="cpu", reuse_caches=True) as pipe:
        reqs = _requests(pipe, 7)
        _run_staggered(pipe, reqs, [0, 1, 1, 3, 6, 6, 8])
        assert not any(c.in_use for bucket in pipe.runner._pool.values() for c in bucket)
