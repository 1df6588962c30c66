"""The ONNX Runtime pipeline against Hugging Face (never) and the independent exit reference."""

import numpy as np
import pytest
import torch

from conftest import encode_inputs, make_image
from reference import gate_exit, generate_with_exit

PROMPTS = ["what color is the circle ?", "how many red squares are there in the picture ?"]


def _inputs(pipe, seed=0, prompt=PROMPTS[0]):
    """(ids [1,T] torch, the image's processor tensors as torch and as numpy)."""
    ids, vision = encode_inputs(pipe, seed, prompt)
    return ids, {k: torch.from_numpy(v) for k, v in vision.items()}, vision


@pytest.mark.parametrize("prompt_index", [0, 1])
def test_never_matches_hf_generate(tiny, pipelines, prompt_index):
    pipe = pipelines(tiny.engine_dir)
    ids, vision, np_vision = _inputs(pipe, prompt_index, PROMPTS[prompt_index])
    hf = tiny.hf
    with torch.no_grad():
        out = hf.generate(input_ids=ids, **vision, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                          do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref_tokens = out.sequences[0, ids.shape[1]:].tolist()
    res = pipe.generate_ids(ids.numpy(), **np_vision, max_new_tokens=10, policy="never", return_logits=True)
    assert res.exit_layer == tiny.spec.num_layers
    assert res.token_ids == ref_tokens
    ref_logits = torch.stack(out.logits, 1)[0].numpy()
    np.testing.assert_allclose(res.logits, ref_logits, atol=2e-4, rtol=0)


def test_layer_exits_match_reference(tiny, pipelines):
    pipe = pipelines(tiny.engine_dir)
    ids, vision, np_vision = _inputs(pipe, 1)
    for k in [0, *tiny.candidates, tiny.spec.num_layers]:
        ref_tokens, ref_logits = generate_with_exit(tiny.hf, ids, vision, k, 8, pipe.manifest.model["eos_token_ids"])
        res = pipe.generate_ids(ids.numpy(), **np_vision, max_new_tokens=8, policy=f"layer:{k}", return_logits=True)
        assert res.exit_layer == k
        assert res.token_ids == ref_tokens, f"layer:{k}"
        np.testing.assert_allclose(res.logits, ref_logits.numpy(), atol=2e-4, rtol=0, err_msg=f"layer:{k}")


def test_exit_changes_the_computation(llama, pipelines):
    """Sanity: the reference is sensitive to the exit layer (else the test above proves little)."""
    pipe = pipelines(llama.engine_dir)
    ids, _, np_vision = _inputs(pipe, 2)
    logits = [pipe.generate_ids(ids.numpy(), **np_vision, max_new_tokens=1, policy=f"layer:{k}",
                                return_logits=True).logits for k in (0, 2, 4)]
    assert np.abs(logits[0] - logits[2]).max() > 1e-3
    assert np.abs(logits[1] - logits[2]).max() > 1e-4


def test_gate_decisions_follow_eq1(tiny, pipelines):
    pipe = pipelines(tiny.engine_dir)
    seen = set()
    for seed in range(3):
        ids, vision, np_vision = _inputs(pipe, seed, PROMPTS[seed % 2])
        _, probs = gate_exit(tiny.hf, tiny.gates, tiny.candidates, ids, vision, threshold=1.1)  # all candidate probs
        values = sorted(probs.values())
        # thresholds between the probabilities make the gate exit at every candidate in turn (where
        # the float32 gate can tell them apart)
        for thr in [0.0, *[(a + b) / 2 for a, b in zip(values, values[1:]) if b - a > 1e-4], 1.0]:
            exp_layer, exp_probs = gate_exit(tiny.hf, tiny.gates, tiny.candidates, ids, vision, thr)
            res = pipe.generate_ids(ids.numpy(), **np_vision, max_new_tokens=3, policy="gate", gate_threshold=thr)
            assert res.exit_layer == exp_layer, (seed, thr, probs)
            assert res.gate_probs.keys() == exp_probs.keys()
            for k, p in exp_probs.items():
                assert res.gate_probs[k] == pytest.approx(p, abs=1e-5)
            seen.add(res.exit_layer)
            # and the tokens after a gate exit are those of the fixed exit at the same layer
            ref_tokens, _ = generate_with_exit(tiny.hf, ids, vision, exp_layer, 3, pipe.manifest.model["eos_token_ids"])
            assert res.token_ids == ref_tokens
    assert len(seen) >= 2


def test_batch_equals_each_alone(tiny, pipelines):
    pipe = pipelines(tiny.engine_dir)
    images = [make_image(s) for s in range(4)]
    prompts = [PROMPTS[0], PROMPTS[1], "is there a green triangle on the left ?", PROMPTS[0]]
    # a threshold that sends the samples to different exits
    thr = 0.5
    batch = pipe.generate(images, prompts, max_new_tokens=6, policy="gate", gate_threshold=thr, return_logits=True)
    alone = [pipe.generate(i, p, max_new_tokens=6, policy="gate", gate_threshold=thr, return_logits=True)
             for i, p in zip(images, prompts)]
    for b, a in zip(batch, alone):
        assert b.exit_layer == a.exit_layer
        assert b.token_ids == a.token_ids
        np.testing.assert_allclose(b.logits, a.logits, atol=1e-4, rtol=0)
    # mixed fixed policies are not per-sample, but a batch under layer:K must equal the singles too
    batch = pipe.generate(images[:3], prompts[:3], max_new_tokens=5, policy=f"layer:{tiny.candidates[0]}")
    for b, i, p in zip(batch, images, prompts):
        assert b.token_ids == pipe.generate(i, p, max_new_tokens=5, policy=f"layer:{tiny.candidates[0]}").token_ids


def test_batch_with_mixed_exits(llama, pipelines):
    """Thresholds chosen per test so that the batch really holds full and exited samples together."""
    pipe = pipelines(llama.engine_dir)
    images = [make_image(s) for s in range(6)]
    prompts = [PROMPTS[s % 2] + " " * s for s in range(6)]
    exits = {}
    for thr in np.linspace(0.05, 0.95, 19):
        res = pipe.generate(images, prompts, max_new_tokens=4, policy="gate", gate_threshold=float(thr))
        layers = {r.exit_layer for r in res}
        if len(layers) >= 2:
            exits[float(thr)] = res
    assert exits, "no threshold mixes exits in one batch"
    thr, res = next(iter(exits.items()))
    for r, i, p in zip(res, images, prompts):
        alone = pipe.generate(i, p, max_new_tokens=4, policy="gate", gate_threshold=thr)
        assert (r.exit_layer, r.token_ids) == (alone.exit_layer, alone.token_ids)
