"""Decoding details: sampling, EOS, timings, batch shapes."""

import json
import shutil

import numpy as np
import pytest

from conftest import make_image


def test_seeded_sampling_is_reproducible(llama, pipelines):
    pipe = pipelines(llama.engine_dir)
    img = make_image(0)
    kw = dict(max_new_tokens=12, policy="never", temperature=1.5)
    a = pipe.generate(img, "what color ?", seed=7, **kw).token_ids
    b = pipe.generate(img, "what color ?", seed=7, **kw).token_ids
    c = [pipe.generate(img, "what color ?", seed=s, **kw).token_ids for s in range(8, 12)]
    assert a == b
    assert any(x != a for x in c)
    greedy = pipe.generate(img, "what color ?", max_new_tokens=12, policy="never").token_ids
    assert pipe.generate(img, "what color ?", seed=3, top_p=1e-6, **kw).token_ids == greedy


def test_stops_at_eos(llama, tmp_path):
    from dyvte.runtime import Pipeline

    engine = tmp_path / "engine"
    shutil.copytree(llama.engine_dir, engine)
    pipe = Pipeline.load(engine, backend="onnxruntime")
    first = pipe.generate(make_image(0), "what color ?", max_new_tokens=6, policy="never").token_ids
    target = first[2]
    mpath = engine / "manifest.json"
    data = json.loads(mpath.read_text())
    data["model"]["eos_token_ids"] = [target]
    mpath.write_text(json.dumps(data))
    res = Pipeline.load(engine, backend="onnxruntime").generate(make_image(0), "what color ?", max_new_tokens=6,
                                                                 policy="never")
    n = first.index(target) + 1
    assert res.token_ids == first[:n] and res.finish_reason == "eos"


def test_timings_and_result_fields(llama, pipelines):
    pipe = pipelines(llama.engine_dir)
    res = pipe.generate(make_image(0), "what color ?", max_new_tokens=5, policy="gate", return_logits=True)
    t = res.timings
    assert t["prefill_s"] > 0 and t["decode_s"] >= 0 and t["total_s"] >= t["prefill_s"]
    assert t["prompt_tokens"] == res.prompt_tokens and t["new_tokens"] == len(res.token_ids)
    assert res.logits.shape == (len(res.token_ids), len(llama.spec.vocab))
    assert res.logits.dtype == np.float32
    assert set(res.gate_probs) <= set(llama.candidates)
    assert isinstance(res.text, str)
    assert json.dumps(res.to_dict())


def test_generate_ids_with_padding_mask(llama, pipelines):
    pipe = pipelines(llama.engine_dir)
    from dyvte.runtime.inputs import encode

    ids_a, px_a = encode(pipe.processor, make_image(0), "what color ?")
    px_a = px_a["pixel_values"]
    ids_b, px_b = encode(pipe.processor, make_image(1), "how many red squares are there ?")
    px_b = px_b["pixel_values"]
    T = max(len(ids_a), len(ids_b))
    ids = np.zeros((2, T), np.int64)
    mask = np.zeros((2, T), np.int64)
    ids[0, : len(ids_a)], mask[0, : len(ids_a)] = ids_a, 1  # right padding is fine too
    ids[1, T - len(ids_b):], mask[1, T - len(ids_b):] = ids_b, 1
    pixels = np.concatenate([px_a.numpy(), px_b.numpy()])
    both = pipe.generate_ids(ids, pixels, attention_mask=mask, max_new_tokens=4, policy="layer:1")
    assert both[0].token_ids == pipe.generate_ids(ids_a[None].numpy(), px_a.numpy(), max_new_tokens=4, policy="layer:1").token_ids
    assert both[1].token_ids == pipe.generate_ids(ids_b[None].numpy(), px_b.numpy(), max_new_tokens=4, policy="layer:1").token_ids


def test_prompt_with_explicit_image_token(llama, pipelines):
    pipe = pipelines(llama.engine_dir)
    a = pipe.generate(make_image(0), "what color ?", max_new_tokens=3, policy="never")
    b = pipe.generate(make_image(0), "USER: <image>\nwhat color ? ASSISTANT:", max_new_tokens=3, policy="never")
    assert a.token_ids == b.token_ids and a.prompt_tokens == b.prompt_tokens
    with pytest.raises(Exception, match="image placeholders"):
        pipe.generate(make_image(0), "USER: <image> <image> two ASSISTANT:")


def _recorded(pipe):
    from dyvte.runtime.pipeline import Pipeline

    from conftest import RecordingRunner

    rec = RecordingRunner(pipe.runner)
    return Pipeline(pipe.manifest, rec, pipe.processor), rec


def test_rows_that_cannot_exit(llama, pipelines):
    """Prompts without an image, or ending with their image tokens (no text for the gate), never
    exit and never reach the text-only group, under every policy; their answers equal `never`."""
    import torch

    base = pipelines(llama.engine_dir)
    pipe, rec = _recorded(base)
    V, image_id = llama.spec.num_visual_tokens, base.manifest.model["image_token_id"]
    L = llama.spec.num_layers
    limit = base.manifest.limits["max_input_len"]
    no_image = torch.randint(5, 30, (limit - V + 10,), generator=torch.Generator().manual_seed(0))
    no_image[0] = 2  # longer than the text-only profile of a TensorRT build (max_input_len - V)
    ends_with_image = torch.cat([torch.tensor([2, 6, 7, 8]), torch.full((V,), image_id)])
    from dyvte.runtime.inputs import encode

    ids, px = encode(base.processor, make_image(0), "what color ?")
    px = px["pixel_values"]
    for policy in ("gate", "layer:1", f"layer:{llama.candidates[-1]}", "layer:0", "never"):
        for prompt, pixels in ((no_image, None), (ends_with_image, px)):
            rec.calls.clear()
            res = pipe.generate_ids(prompt[None].numpy(), None if pixels is None else pixels.numpy(), max_new_tokens=3,
                                    policy=policy, gate_threshold=0.0, return_logits=True)
            ref = pipe.generate_ids(prompt[None].numpy(), None if pixels is None else pixels.numpy(), max_new_tokens=3,
                                    policy="never", return_logits=True)
            assert res.exit_layer == L and res.gate_probs == {}, policy
            assert res.token_ids == ref.token_ids
            np.testing.assert_allclose(res.logits, ref.logits, atol=1e-5)
            assert all(mode != "text" for _, mode, *_ in rec.calls), (policy, rec.calls)
    # in a batch with a row that does exit, only that row goes to the text group
    from dyvte.runtime.pipeline import Request

    rec.calls.clear()
    mixed = pipe.run([Request(ids, px, 2), Request(ends_with_image, px, 2), Request(no_image, None, 2)],
                     policy="layer:1")
    assert [r.exit_layer for r in mixed] == [1, L, L]
    text_calls = [c for c in rec.calls if c[1] == "text"]
    assert text_calls and all(rows == 1 for _, _, rows, *_ in text_calls)


def test_batch_of_requests_with_their_own_options(llama, pipelines):
    """Pipeline.run: each request keeps its token limit and sampling; a batch equals each alone."""
    from dyvte.runtime.pipeline import Request
    from dyvte.runtime.sampling import SamplingParams

    pipe = pipelines(llama.engine_dir)
    reqs = [pipe.encode(make_image(i), p, n, t, 0.9, seed) for i, (p, n, t, seed) in enumerate([
        ("what color ?", 3, 0.0, None), ("how many red squares are there ?", 7, 1.2, 5),
        ("is there a blue triangle ?", 1, 0.0, None), ("what shape ?", 5, 0.7, 9)])]
    batch = pipe.run(reqs, policy="gate", return_logits=True)
    for r, req in zip(batch, reqs):
        alone = pipe.run([req], policy="gate", return_logits=True)[0]
        assert (r.exit_layer, r.token_ids, r.finish_reason) == (alone.exit_layer, alone.token_ids, alone.finish_reason)
        np.testing.assert_allclose(r.logits, alone.logits, atol=1e-4, rtol=0)
        assert len(r.token_ids) <= req.max_new_tokens
    assert [len(r.token_ids) for r in batch][2] == 1
    with pytest.raises(Exception, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(Exception, match="max_new_tokens"):
        pipe.run([Request(reqs[0].input_ids, reqs[0].pixel_values, 0)])


def test_on_step_streams_tokens_and_stops_rows(llama, pipelines):
    pipe = pipelines(llama.engine_dir)
    reqs = [pipe.encode(make_image(i), "what color ?", 6) for i in range(3)]
    full = pipe.run(reqs, policy="never")
    seen = {i: [] for i in range(3)}

    def on_step(step, tokens, active):
        for i, (t, a) in enumerate(zip(tokens, active)):
            if a:
                seen[i].append(t)
        return [1] if step == 1 else None  # stop row 1 after its second token

    res = pipe.run(reqs, policy="never", on_step=on_step)
    assert res[1].token_ids == full[1].token_ids[:2] and res[1].finish_reason == "stop"
    assert res[0].token_ids == full[0].token_ids and res[2].token_ids == full[2].token_ids
    assert {i: seen[i] for i in (0, 2)} == {0: full[0].token_ids, 2: full[2].token_ids} and seen[1] == res[1].token_ids


def test_encode_chat(llama, pipelines, tmp_path):
    pipe = pipelines(llama.engine_dir)
    img = make_image(0)
    a = pipe.generate(img, "what color ?", max_new_tokens=3, policy="never")
    req = pipe.encode_chat([{"role": "user", "content": [{"type": "image", "image": img},
                                                         {"type": "text", "text": "what color ?"}]}], 3)
    b = pipe.run([req], policy="never")[0]
    assert a.token_ids == b.token_ids and a.prompt_tokens == b.prompt_tokens
    text_only = pipe.encode_chat([{"role": "user", "content": "what color ?"}], 3)
    assert text_only.pixel_values is None and pipe.run([text_only], policy="gate")[0].exit_layer == llama.spec.num_layers
    two = pipe.encode_chat([{"role": "user", "content": [{"type": "image", "image": img}, {"type": "image", "image": img},
                                                         {"type": "text", "text": "same ?"}]}])
    assert two.pixel_values.shape[0] == 2 and pipe.run([two], policy="layer:1")[0].exit_layer == 1
    from dyvte.errors import InputError

    for bad in ([], [{"role": "robot", "content": "x"}], [{"role": "user", "content": [{"type": "video"}]}],
                [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "missing.png")}]}]):
        with pytest.raises(InputError):
            pipe.encode_chat(bad)


def test_unseeded_sampling_leaves_the_global_rng_alone(llama, pipelines):
    import torch

    from dyvte.errors import InputError

    pipe = pipelines(llama.engine_dir)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pipe.generate(make_image(0), "what color ?", max_new_tokens=3, policy="never", temperature=0.8)  # no seed
    assert torch.equal(torch.rand(3), expected)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(InputError, match="gate_threshold"):
            pipe.generate(make_image(0), "what color ?", max_new_tokens=1, gate_threshold=bad)


def test_processor_refusals_are_input_errors():
    from dyvte.errors import InputError

    class Refusing:  # a processor that refuses an image, as Qwen-VL's does for aspect ratios > 200
        image_token, chat_template = "<image>", None

        def __call__(self, **kw):
            raise ValueError("absolute aspect ratio must be smaller than 200, got 500.0")

    from dyvte.runtime.inputs import encode

    with pytest.raises(InputError, match="processor cannot take this input.*aspect ratio"):
        encode(Refusing(), make_image(0), "what ?")
