"""The step-level scheduler (runtime/scheduler.py): requests that join a running batch at any step,
and leave it when they finish or are cancelled, answer exactly as they do alone; the KV budget
admits and queues as documented; prefill work per step is bounded."""

import numpy as np
import pytest

from conftest import IMAGE_SIZES, make_image

PROMPTS = ["what color is the circle ?", "how many red squares are there in the picture ?", "is there a blue triangle ?"]
PRUNES = [None, "divprune:0.5", None, "fastv:2:0.6", "divprune:0.3,fastv:1:0.5", None, "fastv:1:0.4"]


def _requests(pipe, n: int, prune: bool = True):
    """Mixed requests: token limits, policies, thresholds, prune specs, sampling, one without an image."""
    reqs = []
    for i in range(n):
        image = make_image(i, IMAGE_SIZES[i % len(IMAGE_SIZES)])
        kw = dict(temperature=0.9, top_p=0.8, seed=i) if i % 4 == 3 else {}
        r = pipe.encode(image, PROMPTS[i % 3] + " ?" * (i % 2), max_new_tokens=[3, 9, 1, 6, 12][i % 5], **kw)
        r.policy = ["gate", "never", "layer:1", "layer:3", "layer:0"][i % 5]
        r.gate_threshold = [0.3, 0.5, 0.7][i % 3]
        r.prune = PRUNES[i % len(PRUNES)] if prune else None
        reqs.append(r)
    return reqs


def _run_staggered(pipe, reqs, arrivals, **options):
    """Drive one scheduler: request i is added before step arrivals[i]. Returns the results in
    order, the decode batch's size after each step, and how many steps ended with a prefill under
    way; checks that every token was streamed through on_token, in order."""
    plan = pipe.plan("auto")
    streamed = {}
    seqs = [pipe.sequence(r, plan, return_logits=True, index=i,
                          on_token=lambda s, t: streamed.setdefault(s.id, []).append(t)) for i, r in enumerate(reqs)]
    sched = pipe.scheduler(**options)
    step, sizes, split = 0, [], 0
    try:
        while not sched.idle or step <= max(arrivals):
            for s, at in zip(seqs, arrivals):
                if at == step:
                    sched.add(s)
            sched.step()
            sizes.append(len(sched.batch))
            split += bool(sched.prefilling)
            step += 1
    finally:
        sched.close()
    assert all(streamed.get(s.id, []) == s.tokens for s in seqs)
    return [pipe.result(s) for s in seqs], sizes, split


def _same(results, alone):
    for i, (got, want) in enumerate(zip(results, alone)):
        assert got.token_ids == want.token_ids, i
        assert got.exit_layer == want.exit_layer and got.finish_reason == want.finish_reason, i
        assert got.gate_probs.keys() == want.gate_probs.keys() and got.segment_tokens == want.segment_tokens, i
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-4, rtol=1e-4, err_msg=str(i))


BACKENDS = [("onnxruntime", {}), ("torch", {"device": "cpu"}), ("torch", {"device": "cpu", "reuse_caches": True})]


@pytest.mark.parametrize("backend,options", BACKENDS, ids=["onnxruntime", "torch", "torch-pooled"])
@pytest.mark.parametrize("name,prefill_tokens", [("llama_gqa", None), ("qwen2_vl", 8)],
                         ids=["llama_gqa", "qwen2_vl-chunked"])
def test_rows_joining_and_leaving_answer_as_alone(tiny_models, backend, options, name, prefill_tokens):
    """Rows with mixed lengths, exits, prune specs and sampling join at many steps and leave at
    others; prefill unbounded, or bounded so that every prefill is spread over several steps."""
    from dyvte.runtime import Pipeline

    model = tiny_models(name)
    with Pipeline.load(model.engine_dir, backend=backend, **options) as pipe:
        reqs = _requests(pipe, 10)
        alone = [pipe.run([r], return_logits=True)[0] for r in reqs]
        results, sizes, split = _run_staggered(pipe, reqs, [0, 0, 1, 2, 2, 4, 5, 5, 9, 12], prefill_tokens=prefill_tokens)
        assert max(sizes) >= (2 if prefill_tokens else 3)  # rows really overlapped
        if prefill_tokens:
            assert split >= 5  # prefills spread over steps while others decoded
        _same(results, alone)


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
    assert sched.idle and sched.kv_reserved == 0
    sched.close()
    for i, (s, a) in enumerate(zip(seqs, alone)):
        if i in (1, 4):
            assert s.finish == "cancelled" and s.tokens == a.token_ids[: len(s.tokens)]
        else:
            assert s.tokens == a.token_ids, i
    # cancelled while its prefill is under way (one segment per step): the prefill is dropped
    sched = pipe.scheduler(prefill_tokens=1, kv_budget=10**9)
    late = pipe.sequence(reqs[0], plan)
    sched.add(late)
    sched.step()
    assert [j.seqs for j in sched.prefilling] == [[late]] and sched.kv_reserved > 0
    assert sched.cache_bytes() > 0
    sched.cancel(late)
    assert sched.step() == [late]
    assert sched.idle and sched.kv_reserved == 0 and sched.cache_bytes() == 0
    assert late.finish == "cancelled" and late.tokens == []


def test_kv_budget_admits_queues_and_counts_exits(llama, pipelines):
    """Worst case reserved at admission, the exit's saving released after prefill: with a budget
    of two worst cases, two never-exiting rows run at once but more exiting ones do."""
    from dyvte.runtime.scheduler import KVBudgetError

    pipe = pipelines(llama.engine_dir)
    plan = pipe.plan("auto")

    def run(policy: str, budget_rows: float):
        reqs = [pipe.encode(make_image(i), PROMPTS[0], max_new_tokens=8) for i in range(6)]
        for r in reqs:
            r.policy = policy
        alone = [pipe.run([r])[0] for r in reqs]
        sched = pipe.scheduler()
        seqs = [pipe.sequence(r, plan) for r in reqs]
        worst = sched.kv_bytes(seqs[0])
        assert all(sched.kv_bytes(s) == worst for s in seqs)
        assert worst == (len(seqs[0].input_ids) + 8 - 1) * llama.spec.num_layers * sched.token_layer_bytes
        budget = int(worst * budget_rows)
        sched = pipe.scheduler(kv_budget=budget)
        for s in seqs:
            sched.add(s)
        most, queued = 0, False
        while not sched.idle:
            sched.step()
            running = list(sched.running.values())
            assert sched.kv_reserved <= budget
            assert sched.kv_reserved == sum(s.kv_reserved for s in running) + \
                sum(s.kv_reserved for j in sched.prefilling for s in j.seqs)
            for s in running:  # after its prefill: exactly its segments' tokens
                assert s.kv_reserved == sched.kv_bytes_planned(s) <= worst
            most = max(most, len(running))
            queued |= bool(sched.waiting) and bool(running)
        assert sched.kv_reserved == 0 and queued
        assert [s.tokens for s in seqs] == [a.token_ids for a in alone]
        with pytest.raises(KVBudgetError, match="KV cache"):
            sched.add(pipe.sequence(pipe.encode(make_image(0), PROMPTS[1] + " ?" * 40, max_new_tokens=30), plan))
        return most, seqs

    most, _ = run("never", 2.2)
    assert most == 2
    most, seqs = run("layer:1", 2.2)  # exits after layer 1: text-only caches from there on
    assert all(s.exit_layer == 1 for s in seqs) and most >= 3


def test_prefill_work_per_step_is_bounded(llama, pipelines):
    """A long prompt arriving while a row decodes is prefilled a segment at a time within the
    bound; the decoding row gets one token in every step meanwhile."""
    pipe = pipelines(llama.engine_dir)
    plan = pipe.plan("never")
    short = pipe.sequence(pipe.encode(make_image(1), PROMPTS[0], max_new_tokens=12), plan)
    long = pipe.sequence(pipe.encode(make_image(2), PROMPTS[1] + " ?" * 100, max_new_tokens=4), plan)
    n_long = len(long.input_ids)
    want = [pipe.run([pipe.encode(make_image(1), PROMPTS[0], max_new_tokens=12)], "never")[0].token_ids,
            pipe.run([pipe.encode(make_image(2), PROMPTS[1] + " ?" * 100, max_new_tokens=4)], "never")[0].token_ids]
    L = llama.spec.num_layers
    sched = pipe.scheduler(prefill_tokens=n_long // L + 1)  # one segment of the long prompt fits a step, two do not
    budget = sched.prefill_budget
    assert n_long <= budget < 2 * n_long and len(short.input_ids) * L <= budget
    sched.add(short)
    sched.step()  # short: its whole prefill fits, first token
    sched.add(long)
    steps = 0
    while long.first_token_at is None:
        before = len(short.tokens)
        sched.step()
        steps += 1
        assert len(short.tokens) == before + 1  # decode never stalls
        assert 0 < sched.last.prefill_work <= budget
    assert steps == len(sched.d.segments)  # one 1-layer segment per step
    sched.run_until_done()
    assert [short.tokens, long.tokens] == want
    # a bound smaller than one segment still makes progress: one segment per step
    sched = pipe.scheduler(prefill_tokens=1)
    again = pipe.sequence(pipe.encode(make_image(2), PROMPTS[1] + " ?" * 100, max_new_tokens=4), plan)
    sched.add(again)
    for _ in range(len(sched.d.segments)):
        assert again.first_token_at is None
        sched.step()
        assert sched.last.prefill_work == n_long  # [1, n] padded tokens through one layer
    sched.run_until_done()
    assert again.tokens == want[1]


def test_caches_are_released(llama):
    """Pooled torch caches go back to the pool when rows leave: nothing stays in use."""
    from dyvte.runtime import Pipeline

    with Pipeline.load(llama.engine_dir, backend="torch", device="cpu", reuse_caches=True) as pipe:
        reqs = _requests(pipe, 7)
        _run_staggered(pipe, reqs, [0, 1, 1, 3, 6, 6, 8], prefill_tokens=8)
        assert not any(c.in_use for bucket in pipe.runner._pool.values() for c in bucket)
