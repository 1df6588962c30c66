"""Gemma 3 specifics: the decoder read from the checkpoint, masks that matter (an image's tokens
attend both ways, sliding layers count positions, not cache entries), DivPrune leaving gaps in
the positions and half-images (against the reference on the tokens kept), torch = ONNX Runtime
with pruning, token_type_ids, the images-per-prompt limit, vision FLOPs. never = HF generate,
layer:K = the reference, gates, batches and every command run through the generic tests."""

import numpy as np
import pytest
import torch

import reference as R
from conftest import make_image
from reference import TokenPlan, _merged_embeddings, divprune_pick, generate_with_plan


@pytest.fixture(scope="module")
def gemma(tiny_models):
    return tiny_models("gemma3")


@pytest.fixture(scope="module")
def torch_pipe(gemma):
    from dyvte.runtime import Pipeline

    with Pipeline.load(gemma.engine_dir, backend="torch") as pipe:
        yield pipe


def _inputs(pipe, seed=1, size=(90, 40), prompt="how many red squares are there in the picture ?"):
    req = pipe.encode(make_image(seed, size), prompt, 8)
    return req, req.input_ids[None], {k: torch.as_tensor(v) for k, v in req.vision_inputs().items()}


def test_decoder_spec_from_the_checkpoint(gemma, pipelines):
    t = pipelines(gemma.engine_dir).manifest.text
    assert (t["qk_norm"], t["norm_offset"], t["sandwich_norms"], t["image_bidirectional"]) == (True, 1.0, True, True)
    assert t["embed_scale"] == 8.0 and t["attn_scale"] == pytest.approx(24 ** -0.5)
    assert t["hidden_act"] == "gelu_pytorch_tanh"
    assert t["layer_types"] == list(gemma.spec.layer_types) and t["sliding_window"] == 8
    seg = {p.name: [i["name"] for i in p.inputs] for p in pipelines(gemma.engine_dir).manifest.segments}
    assert "key_positions" in seg["segment_0"] and "key_positions" not in seg["segment_1"]  # full layers: no window
    assert all("token_groups" in names for names in seg.values())


def test_masks_matter(gemma, pipelines, monkeypatch):
    """The reference with a plain causal mask, without the window, or with a window over cache
    entries (not positions) gives other logits than dyvte, which equals the true reference: each
    rule is exercised (the image has 16 tokens, the window is 8)."""
    pipe = pipelines(gemma.engine_dir)
    req, ids, vision = _inputs(pipe)
    k = gemma.candidates[1]
    ours = pipe.run([req], policy=f"layer:{k}", return_logits=True)[0].logits
    _, ref = R.generate_with_exit(gemma.hf, ids, vision, k, len(ours))
    np.testing.assert_allclose(ours, ref.numpy(), atol=2e-4, rtol=0)
    layer_mask = R._layer_mask
    config = gemma.hf.model.language_model.config
    variants = {
        "causal only": lambda m: m.setattr(R, "_groups", lambda *a: None),
        "no window": lambda m: m.setattr(config, "sliding_window", 10 ** 6),
        "window over cache entries": lambda m: m.setattr(
            R, "_layer_mask", lambda cfg, i, pos, groups, dtype: layer_mask(cfg, i, torch.arange(pos.shape[-1]), groups,
                                                                            dtype)),
    }
    for name, change in variants.items():
        with monkeypatch.context() as m:
            change(m)
            _, other = R.generate_with_exit(gemma.hf, ids, vision, k, 1)
        assert np.abs(other[0].numpy() - ours[0]).max() > 1e-3, name
    with torch.no_grad():  # and HF itself: without token_type_ids its masks are causal, and it answers otherwise
        causal = gemma.hf(input_ids=ids, pixel_values=vision["pixel_values"]).logits[0, -1]
        full = gemma.hf(input_ids=ids, **vision).logits[0, -1]
    assert (causal - full).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_divprune_leaves_gaps_and_half_images(gemma, pipelines, torch_pipe, backend):
    """DivPrune keeps half of each prompt's visual tokens: the kept tokens keep their positions
    (the window spans the gaps) and their image block; tokens = the reference on the kept tokens,
    alone and in a batch with an unpruned, exiting row."""
    pipe = pipelines(gemma.engine_dir) if backend == "onnxruntime" else torch_pipe
    req, ids, vision = _inputs(pipe)
    embeds, visual = _merged_embeddings(gemma.hf, ids, vision)
    kept = divprune_pick(embeds[visual], 0.5)
    assert 0 < len(kept) < int(visual.sum())
    k = gemma.candidates[2]
    eos = pipe.manifest.model["eos_token_ids"]
    ref_tokens, ref_logits = generate_with_plan(gemma.hf, ids, vision, TokenPlan(k, divprune=0.5), 8, eos)
    res = pipe.run([req], policy=f"layer:{k}", prune="divprune:0.5", return_logits=True)[0]
    assert res.token_ids == ref_tokens
    np.testing.assert_allclose(res.logits, ref_logits.numpy(), atol=2e-4, rtol=0)
    other = pipe.encode(make_image(4, (31, 70)), "is there a blue triangle ?", 8)
    batch = pipe.run([other, req], policy="gate", gate_threshold=0.5, prune="divprune:0.5", return_logits=True)
    for r, q in zip(batch, [other, req]):
        alone = pipe.run([q], policy="gate", gate_threshold=0.5, prune="divprune:0.5", return_logits=True)[0]
        assert (r.exit_layer, r.token_ids) == (alone.exit_layer, alone.token_ids)
        np.testing.assert_allclose(r.logits, alone.logits, atol=1e-4, rtol=0)


def test_fastv_torch_equals_onnxruntime(gemma, pipelines, torch_pipe):
    ort, pt = pipelines(gemma.engine_dir), torch_pipe
    reqs = [ort.encode(make_image(s, size), q, 6) for s, (size, q) in
            enumerate([((90, 40), "what color is the circle ?"), ((40, 52), "is there a blue triangle ?")])]
    for prune in ("fastv:2:0.5", "divprune:0.25,fastv:1:0.5"):
        a = ort.run(reqs, policy="never", prune=prune, return_logits=True)
        b = pt.run(reqs, policy="never", prune=prune, return_logits=True)
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            np.testing.assert_allclose(x.logits, y.logits, atol=1e-4, rtol=0)


def test_token_type_ids_and_images_per_prompt(gemma, tmp_path):
    """generate_ids takes the processor's token_type_ids; --max-tiles bounds the images of a prompt."""
    from dyvte.errors import InputError
    from dyvte.exporter import ExportSettings, export
    from dyvte.runtime import Pipeline

    out = export(ExportSettings(out=tmp_path / "e", model=str(gemma.model_dir), candidates=[2], max_tiles=1,
                                max_input_len=128, max_new_tokens=4, progress=False, validate=False))
    pipe = Pipeline.load(out, backend="onnxruntime")
    req, ids, vision = _inputs(pipe)
    assert vision["token_type_ids"].shape == ids.shape and int(vision["token_type_ids"].sum()) == 16
    a = pipe.generate_ids(ids.numpy(), **{k: v.numpy() for k, v in vision.items()}, max_new_tokens=3, policy="never")
    b = pipe.generate_ids(ids.numpy(), vision["pixel_values"].numpy(), max_new_tokens=3, policy="never")
    assert a.token_ids == b.token_ids
    two = pipe.encode_chat([{"role": "user", "content": [{"type": "image", "image": make_image(0)},
                                                         {"type": "image", "image": make_image(1)},
                                                         {"type": "text", "text": "what ?"}]}], 2)
    with pytest.raises(InputError, match=r"make 2 tiles; this engine folder takes at most 1 per prompt.*--max-tiles"):
        pipe.run([two])


def test_vision_flops(gemma, pipelines):
    """SigLIP without a CLS token (patch embedding, every layer) + the projection 2·tokens·E·D."""
    pipe = pipelines(gemma.engine_dir)
    s = gemma.spec
    E, M, P = s.vision_hidden_size, s.vision_intermediate_size, (s.image_size // s.patch_size) ** 2
    per_layer = 8 * P * E * E + 4 * P * P * E + 4 * P * E * M
    expected = 2 * P * 3 * s.patch_size ** 2 * E + s.vision_layers * per_layer + 2 * 16 * E * s.hidden_size
    cfg = gemma.hf.config.vision_config.to_dict()
    assert pipe.family.vision_flops(pipe.vision_meta, cfg, s.hidden_size, 2) == pytest.approx(2 * expected, rel=1e-12)


def test_validation_catches_a_rounded_sliding_rope_table(gemma, tmp_path, monkeypatch):
    """The sliding layers' own RoPE table stays float32 in fp16 graphs: one rounded to fp16 passes the
    short cases but fails validation at the folder's longest positions."""
    import dyvte.exporter.export_model as em
    from dyvte.errors import ValidationError
    from dyvte.exporter import ExportSettings, export

    real = em.hf.segment_from_hf

    def rounded(*args):
        seg = real(*args)
        seg.inv_freq_sliding = seg.inv_freq_sliding.half().float()
        return seg

    monkeypatch.setattr(em.hf, "segment_from_hf", rounded)
    with pytest.raises(ValidationError, match=r"segment_0 \(long"):
        export(ExportSettings(out=tmp_path / "e", model=str(gemma.model_dir), candidates=[2], dtype="float16",
                              max_input_len=1900, max_new_tokens=100, progress=False))
