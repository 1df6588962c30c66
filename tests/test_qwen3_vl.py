"""Qwen3-VL specifics: the position-table taps against HF's helper, the decoder read from the
checkpoint, DeepStack and interleaved M-RoPE that matter, DivPrune before DeepStack (only the visual
tokens kept receive it: against the reference on the kept tokens), torch = ONNX Runtime with
pruning. Positions, rope deltas, grids, video refusal, the pixel limit and the vision graph run in
tests/test_qwen_vl.py; never = HF generate, layer:K = the reference (layer:1 exits before DeepStack
ends), gates, batches and every command in the generic tests."""

import numpy as np
import pytest
import torch

import reference as R
from conftest import make_image
from reference import TokenPlan, _merged_embeddings, divprune_pick, generate_with_plan


@pytest.fixture(scope="module")
def qwen3(tiny_models):
    return tiny_models("qwen3_vl")


@pytest.fixture(scope="module")
def torch_pipe(qwen3):
    from dyvte.runtime import Pipeline

    with Pipeline.load(qwen3.engine_dir, backend="torch") as pipe:
        yield pipe


def _inputs(pipe, seed=1, size=(90, 40), prompt="how many red squares are there in the picture ?"):
    req = pipe.encode(make_image(seed, size), prompt, 8)
    return req, req.input_ids[None], {k: torch.as_tensor(v) for k, v in req.vision_inputs().items()}


@pytest.mark.parametrize("h,w,side", [(2, 2, 4), (10, 22, 4), (6, 4, 48), (16, 2, 5), (4, 30, 7)])
def test_position_taps_equal_hf(h, w, side):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    from dyvte.families.qwen3_vl import interpolation_taps

    index, weight = interpolation_taps(h, w, side, 2)
    ref_i, ref_w = get_vision_interpolation_indices_and_weights(torch.tensor([[1, h, w]]), side, mode="bilinear",
                                                                align_corners=True, spatial_merge_size=2)
    assert np.array_equal(index, ref_i.numpy()) and np.array_equal(weight, ref_w.numpy())


def test_decoder_spec_from_the_checkpoint(qwen3, pipelines):
    m = pipelines(qwen3.engine_dir).manifest
    t = m.text
    assert t["qk_norm"] and t["mrope_interleaved"] and t["mrope_section"] == [2, 3, 3] and t["deepstack_layers"] == 2
    assert t["norm_offset"] == 0.0 and not t["sandwich_norms"] and t["layer_types"] is None
    takes = [any(i["name"] == "deepstack" for i in p.inputs) for p in m.segments]
    assert takes == [True, True, False, False]  # segments [0,1), [1,2) hold DeepStack layers 0 and 1
    assert [i["shape"] for i in m.segments[0].inputs if i["name"] == "deepstack"] == [["batch", "seq", 2, 64]]


def test_deepstack_and_interleaving_matter(qwen3, pipelines, monkeypatch):
    """Without DeepStack, or with Qwen2-VL's contiguous M-RoPE chunks, the reference gives other
    logits than dyvte, which equals the true reference."""
    pipe = pipelines(qwen3.engine_dir)
    req, ids, vision = _inputs(pipe)
    ours = pipe.run([req], policy="never", return_logits=True)[0].logits
    _, ref = R.generate_with_exit(qwen3.hf, ids, vision, qwen3.spec.num_layers, len(ours))
    np.testing.assert_allclose(ours, ref.numpy(), atol=2e-4, rtol=0)
    merged = R._merged_inputs
    monkeypatch.setattr(R, "_merged_inputs", lambda *a, **k: (*merged(*a, **k)[:2], None))
    _, other = R.generate_with_exit(qwen3.hf, ids, vision, qwen3.spec.num_layers, 1)
    assert np.abs(other[0].numpy() - ours[0]).max() > 1e-3
    from dyvte.runtime import Pipeline

    with Pipeline.load(qwen3.engine_dir, backend="torch") as chunked:
        for seg in chunked.runner.segments:  # Qwen2-VL's contiguous chunks of section [2, 3, 3]
            seg.mrope_rows.copy_(torch.tensor([0, 0, 1, 1, 1, 2, 2, 2]))
        other = chunked.run([req], policy="never", return_logits=True)[0].logits
    assert np.abs(other[0] - ours[0]).max() > 1e-3


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_divprune_before_deepstack(qwen3, pipelines, torch_pipe, backend):
    """DivPrune keeps half the visual tokens before layer 0: DeepStack reaches only those (at layers
    0 and 1), each with its own feature; = the reference on the kept tokens, exit or not."""
    pipe = pipelines(qwen3.engine_dir) if backend == "onnxruntime" else torch_pipe
    req, ids, vision = _inputs(pipe)
    embeds, visual = _merged_embeddings(qwen3.hf, ids, vision)
    kept = divprune_pick(embeds[visual], 0.5)
    assert 0 < len(kept) < int(visual.sum())
    eos = pipe.manifest.model["eos_token_ids"]
    for k in (1, qwen3.spec.num_layers):
        ref_tokens, ref_logits = generate_with_plan(qwen3.hf, ids, vision, TokenPlan(k, divprune=0.5), 8, eos)
        res = pipe.run([req], policy=f"layer:{k}", prune="divprune:0.5", return_logits=True)[0]
        assert res.token_ids == ref_tokens, k
        np.testing.assert_allclose(res.logits, ref_logits.numpy(), atol=2e-4, rtol=0, err_msg=str(k))


def test_pruning_torch_equals_onnxruntime_in_batches(qwen3, pipelines, torch_pipe):
    ort = pipelines(qwen3.engine_dir)
    reqs = [ort.encode(make_image(s, size), q, 6) for s, (size, q) in
            enumerate([((90, 40), "what color is the circle ?"), ((40, 52), "is there a blue triangle ?"),
                       ((64, 64), "which shape is on the left ?")])]
    for policy, prune in (("never", "fastv:1:0.5"), ("gate", "divprune:0.25,fastv:2:0.5")):
        a = ort.run(reqs, policy=policy, prune=prune, return_logits=True)
        b = torch_pipe.run(reqs, policy=policy, prune=prune, return_logits=True)
        for x, y, r in zip(a, b, reqs):
            alone = ort.run([r], policy=policy, prune=prune, return_logits=True)[0]
            assert x.token_ids == y.token_ids == alone.token_ids and x.exit_layer == y.exit_layer == alone.exit_layer
            np.testing.assert_allclose(x.logits, y.logits, atol=1e-4, rtol=0)
            np.testing.assert_allclose(x.logits, alone.logits, atol=1e-4, rtol=0)
