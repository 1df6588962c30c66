"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL specifics: M-RoPE positions and rope deltas against HF's ``get_rope_index``,
decode positions after an exit, the host-side window layout and rotary positions against HF's
helpers, the pixel limit (``--max-pixels``), inconsistent grids, video inputs, the vision FLOPs and
TensorRT profiles. Equivalence with HF ``generate``, the exit reference, gates and batches run on the
Qwen fixtures through the generic tests (test_runtime_equivalence.py, test_families.py, ...)."""

import numpy as np
import pytest
import torch

from conftest import RecordingRunner, make_image
from reference import generate_with_exit

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
TWO_IMAGES = [(90, 40), (40, 52)]


@pytest.fixture(scope="module", params=QWEN)
def qwen(request, tiny_models):
    return tiny_models(request.param)


def _chat(pipe, sizes, question="what color ?", seed=0):
    parts = []
    for j, size in enumerate(sizes):
        parts += [{"type": "image", "image": make_image(seed + j, size)}, {"type": "text", "text": "and" if j else "see"}]
    parts[-1] = {"type": "text", "text": question}
    return pipe.encode_chat([{"role": "user", "content": parts}], 6)


@pytest.mark.parametrize("sizes", [[(90, 40)], TWO_IMAGES, [(64, 64), (20, 20), (31, 70)], []])
def test_positions_equal_get_rope_index(qwen, pipelines, sizes):
    """Each prompt's three rows and its next position equal HF's rows and T + rope delta."""
    pipe = pipelines(qwen.engine_dir)
    req = _chat(pipe, sizes) if sizes else pipe.encode_chat([{"role": "user", "content": "what color ?"}])
    ids = req.input_ids
    vision = pipe.family.prepare(pipe.vision_meta, req.vision_inputs())
    image_id = pipe.manifest.model["image_token_id"]
    pos, nxt = pipe.family.positions(pipe.vision_meta, ids == image_id, vision)
    types = (ids == image_id).int()[None]
    grids = req.extra["image_grid_thw"] if sizes else None
    ref, delta = qwen.hf.model.get_rope_index(ids[None], types, image_grid_thw=grids)
    assert torch.equal(pos.T, ref[:, 0]) and nxt == len(ids) + int(delta)
    if sizes:
        assert nxt < len(ids)  # an image's tokens take fewer positions than tokens: decoding is not at T
        assert len(set(map(tuple, pos[ids == image_id].tolist()))) == int((ids == image_id).sum())  # distinct rows


def test_batch_positions_are_left_padded_rows(qwen, pipelines):
    from dyvte.runtime.dispatch import make_batch

    pipe = pipelines(qwen.engine_dir)
    reqs = [_chat(pipe, TWO_IMAGES), pipe.encode(make_image(3, (31, 70)), "what ?")]
    visions = [pipe.family.prepare(pipe.vision_meta, r.vision_inputs()) for r in reqs]
    image_id = pipe.manifest.model["image_token_id"]
    batch = make_batch([r.input_ids for r in reqs], visions, image_id, "cpu", pipe.family, pipe.vision_meta)
    T = batch.ids.shape[1]
    for i, (r, v) in enumerate(zip(reqs, visions)):
        pos, nxt = pipe.family.positions(pipe.vision_meta, r.input_ids == image_id, v)
        assert torch.equal(batch.positions[i, T - len(pos):], pos) and int(batch.next_positions[i]) == nxt
        assert not batch.positions[i, : T - len(pos)].any()


def test_exit_keeps_rows_and_decoding_continues_from_rope_delta(qwen, pipelines):
    """In a batch where one row exits and one does not, the text-only group carries the original
    (t, h, w) rows of its remaining tokens, and every decode step of both groups is at
    max position + 1 + step in all three rows."""
    import copy

    from dyvte.runtime.pipeline import Pipeline

    base = pipelines(qwen.engine_dir)
    rec = RecordingRunner(base.runner)
    manifest = copy.deepcopy(base.manifest)
    manifest.data["model"]["eos_token_ids"] = []  # always 6 tokens: 5 decode steps to check
    pipe = Pipeline(manifest, rec, base.processor)
    reqs = [_chat(base, TWO_IMAGES), base.encode(make_image(5, (64, 64)), "what color is the circle ?", 6)]
    image_id = base.manifest.model["image_token_id"]
    rows = [base.family.positions(base.vision_meta, r.input_ids == image_id,
                                  base.family.prepare(base.vision_meta, r.vision_inputs())) for r in reqs]
    k = qwen.candidates[0]
    # gate threshold chosen per row so that exactly the first row exits at k: run the gate probs first
    probe = [base.run([r], policy="gate", gate_threshold=1.0)[0].gate_probs[k] for r in reqs]
    assert abs(probe[0] - probe[1]) > 1e-3, probe
    thr = (probe[0] + probe[1]) / 2
    res = pipe.run(reqs, policy="gate", gate_threshold=thr)
    exited = [r.exit_layer == k for r in res]
    assert sorted(exited) == [False, True] and all(len(r.token_ids) == 6 for r in res)
    text_calls = [p for _, mode, _, _, p in rec.calls if mode == "text"]
    assert text_calls, "no text-only prefill"
    j = exited.index(True)
    pos, _ = rows[j]
    kept = pos[reqs[j].input_ids != image_id]  # [n,3] the remaining tokens' original rows
    got = text_calls[0][:, 0].T  # [3,1,S] -> [S,3]
    assert torch.equal(got[-len(kept):], kept)
    steps = []  # decode calls per step (a step starts at segment 0)
    for index, mode, _, _, p in rec.calls:
        if mode == "decode":
            if index == 0:
                steps.append([])
            steps[-1].append(p)
    assert len(steps) == 5
    for step, calls in enumerate(steps, 1):
        seen = set()
        for p in calls:
            assert p.shape[0] == 3 and p.shape[2] == 1  # [3,G,1]
            assert (p == p[:1]).all()  # the same position in t, h and w
            seen |= {int(v) for v in p[0, :, 0]}
        assert seen == {rows[0][1] + step - 1, rows[1][1] + step - 1}, step
    # and the answers equal the independent reference at each row's own exit
    for r, req in zip(res, reqs):
        vision = {key: torch.as_tensor(v) for key, v in req.vision_inputs().items()}
        ref, _ = generate_with_exit(qwen.hf, req.input_ids[None], vision, r.exit_layer, 6)
        assert r.token_ids == ref


def test_wrong_positions_would_be_caught(qwen, pipelines, monkeypatch):
    """Sanity: 1-D positions, or decoding from the prompt length instead of the rope delta,
    change the logits (so the equality tests above and in test_runtime_equivalence can fail)."""
    pipe = pipelines(qwen.engine_dir)
    req = _chat(pipe, TWO_IMAGES)
    kw = dict(policy=f"layer:{qwen.candidates[1]}", return_logits=True)
    good = pipe.run([req], **kw)[0].logits
    family = type(pipe.family)
    real = family.positions
    monkeypatch.setattr(family, "positions", lambda self, meta, visual, vision: (real(self, meta, visual, vision)[0],
                                                                                 len(visual)))
    late = pipe.run([req], **kw)[0].logits
    assert np.abs(late[0] - good[0]).max() == 0 and np.abs(late[1:] - good[1:]).max() > 1e-3
    monkeypatch.setattr(family, "positions", lambda self, meta, visual, vision: (
        torch.arange(len(visual))[:, None].expand(-1, 3).clone(), len(visual)))
    flat = pipe.run([req], **kw)[0].logits
    assert np.abs(flat[0] - good[0]).max() > 1e-3


def test_host_layout_equals_hf_helpers():
    """Rotary positions and (padded) windows computed on the host = HF's vision_utils."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    from dyvte.families.qwen_vl import most_windows, rotary_positions, window_layout

    for h, w, units in [(10, 22, 3), (12, 12, 3), (2, 2, 4), (6, 20, 2), (18, 6, 4), (16, 16, 4), (2, 40, 4)]:
        grid = torch.tensor([[1, h, w]])
        assert np.array_equal(rotary_positions(h, w, 2), get_vision_position_ids(grid, 2).numpy())
        widx, cu = get_vision_window_index(grid, 2, units * 2 * 14, 14)
        rows = (widx[:, None] * 4 + torch.arange(4)).flatten().tolist()
        hf_windows = [sorted(rows[a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        index, valid, scatter = window_layout(h, w, 2, units)
        assert [sorted(index[i][valid[i] == 1].tolist()) for i in range(len(index))] == hf_windows
        assert valid.shape[1] == (2 * units) ** 2 and index.reshape(-1)[scatter].tolist() == list(range(h * w))
        assert (index[valid == 0] == np.repeat(index[:, :1], valid.shape[1], 1)[valid == 0]).all()  # padding: 1st row
        assert len(index) <= most_windows(h * w // 4, units)
    assert most_windows(16, 4) == 4 and most_windows(4, 4) == 1  # 4x4 units: 1 window; 1x16: 4; 2x2: 1


def test_image_above_the_exported_pixel_limit(qwen, tmp_path):
    """--max-pixels bounds the vision graph and the saved processor: large images are resized to
    fit by the folder's processor; raw inputs beyond it are refused with a one-line error."""
    from dyvte.engines.manifest import Manifest
    from dyvte.engines.profiles import Limits, part_profiles
    from dyvte.errors import InputError
    from dyvte.exporter import ExportSettings, export
    from dyvte.models import load_processor
    from dyvte.runtime import Pipeline
    from dyvte.runtime.inputs import encode

    limit = 40 * 8 * 8  # 40 visual tokens of 8x8 px
    out = export(ExportSettings(out=tmp_path / "e", model=str(qwen.model_dir), candidates=[2], max_pixels=limit,
                                max_input_len=256, max_new_tokens=4, progress=False, validate=False))
    pipe = Pipeline.load(out, backend="onnxruntime")
    meta = pipe.vision_meta
    assert meta["max_pixels"] == limit and meta["max_patches"] == 160
    big = make_image(0, (120, 100))
    res = pipe.generate(big, "what ?", max_new_tokens=1, policy="never")  # the folder's processor resizes it
    assert 0 < res.visual_tokens <= 40
    ids, vision = encode(load_processor(qwen.model_dir), big, "what ?")  # the checkpoint's processor: 6,400 px
    with pytest.raises(InputError, match=r"above this engine folder's limit of 160 patches \(2560 px\).*--max-pixels"):
        pipe.generate_ids(ids[None].numpy(), **{k: v.numpy() for k, v in vision.items()}, max_new_tokens=1)
    m = Manifest.load(out)
    prof = part_profiles(m, m.parts["vision"], Limits.from_manifest(m))["default"]
    assert prof["patches"] == (4, 160, 160)
    if qwen.spec.family == "qwen2_5_vl":
        assert prof["windows"][0] == 1 and prof["windows"][2] >= 160 // 36
    else:
        assert "windows" not in prof
    with pytest.raises(InputError, match="below the processor's min_pixels"):
        export(ExportSettings(out=tmp_path / "e2", model=str(qwen.model_dir), max_pixels=100, progress=False))


def test_max_pixels_is_refused_for_fixed_tiles(llama, tmp_path):
    from dyvte.errors import InputError
    from dyvte.exporter import ExportSettings, export

    with pytest.raises(InputError, match="--max-pixels applies to dynamic-resolution families"):
        export(ExportSettings(out=tmp_path / "e", model=str(llama.model_dir), max_pixels=10000, progress=False))


def test_inconsistent_grids_and_video_inputs(qwen, pipelines):
    from dyvte.errors import InputError

    pipe = pipelines(qwen.engine_dir)
    req = _chat(pipe, TWO_IMAGES)
    ids = req.input_ids[None].numpy()
    px = req.pixel_values.numpy()
    grid = req.extra["image_grid_thw"].numpy()
    types = req.extra["mm_token_type_ids"].numpy()

    def run(**kw):
        args = dict(pixel_values=px, image_grid_thw=grid, mm_token_type_ids=types, max_new_tokens=1)
        return pipe.generate_ids(ids, **{**args, **kw})

    assert grid[0].tolist() != grid[1].tolist()
    run()  # consistent inputs run
    with pytest.raises(InputError, match="do not match the prompt's run of image tokens"):
        run(image_grid_thw=grid[::-1].copy())  # the images' grids in the wrong order
    with pytest.raises(InputError, match="describes .* patches but pixel_values has"):
        run(pixel_values=px[:-4])  # a merged unit's patch rows missing
    with pytest.raises(InputError, match="which no run of the given image_grid_thw makes"):
        run(image_grid_thw=np.array([grid[0], [1, 2, 2]]))
    with pytest.raises(InputError, match="whole 2x2 patch blocks"):
        run(image_grid_thw=np.array([grid[0], [1, grid[1][1] + 1, grid[1][2]]]))
    with pytest.raises(InputError, match="video, which is not supported"):
        run(image_grid_thw=np.array([grid[0], [2, grid[1][1] // 2, grid[1][2]]]))
    with pytest.raises(InputError, match="marks 3 image tokens but image_grid_thw gives"):
        run(mm_token_type_ids=np.pad(np.ones((1, 3), np.int64), ((0, 0), (0, ids.shape[1] - 3))))
    with pytest.raises(InputError, match="video inputs are not supported"):
        run(mm_token_type_ids=np.where(types == 1, 2, types))
    with pytest.raises(InputError, match="pixel_values_videos, video_grid_thw: video inputs are not supported"):
        run(pixel_values_videos=px, video_grid_thw=grid)
    video = pipe.manifest.model["vision"]["video_token_id"]
    with pytest.raises(InputError, match=r"holds video tokens \(<\|video_pad\|>\); video inputs are not supported"):
        pipe.generate_ids(np.concatenate([ids, [[video]]], 1), px, image_grid_thw=grid, max_new_tokens=1)


def test_vision_flops_count_windows_and_full_blocks(qwen, pipelines):
    """Qwen2.5-VL window blocks cost 4·E·Σ n_w² (their windows), full blocks 4·P²·E; Qwen2-VL is
    full everywhere; FLOPs grow with the image."""
    from dyvte.families.qwen_vl import window_layout

    pipe = pipelines(qwen.engine_dir)
    meta, family = pipe.vision_meta, pipe.family
    E, M, depth = meta["vision_width"], meta["vision_mlp"], meta["vision_layers"]
    D = pipe.manifest.text["hidden_size"]
    h, w = 10, 22
    P = h * w
    full_attn = 4 * P * P * E
    if qwen.spec.family == "qwen3_vl":  # full attention everywhere, GELU MLP, the learned position table's
        # 4 taps per patch, and the main merger plus one per DeepStack layer
        blocks = depth * (8 * P * E * E + 4 * P * E * M + 4 * P * P * E)
        expected = 2 * P * meta["tile_shape"][0] * E + 8 * P * E + blocks + 3 * 2 * (P // 4) * 4 * E * (4 * E + D)
        assert family.vision_flops(meta, {}, D, 1, [[1, h, w]]) == pytest.approx(expected, rel=1e-12)
        return
    if meta["gated_mlp"]:
        _, valid, _ = window_layout(h, w, 2, meta["window_units"])
        window_attn = 4 * E * int((valid.sum(1) ** 2).sum())
        assert window_attn < full_attn
        attention = sum(full_attn if i in meta["full_blocks"] else window_attn for i in range(depth))
        mlp = 6 * P * E * M
    else:
        attention, mlp = depth * full_attn, 4 * P * E * M
    expected = (2 * P * meta["tile_shape"][0] * E + depth * (8 * P * E * E + mlp) + attention
                + 2 * (P // 4) * 4 * E * (4 * E + D))
    got = family.vision_flops(meta, {}, D, 1, [[1, h, w]])
    assert got == pytest.approx(expected, rel=1e-12)
    assert family.vision_flops(meta, {}, D, 2, [[1, h, w], [1, 4, 4]]) > got > family.vision_flops(meta, {}, D, 1,
                                                                                                    [[1, 8, 8]])
    r = pipe.generate(make_image(0, (90, 40)), "what ?", max_new_tokens=1, policy="never")
    assert r.image_tiles == 1 and r.image_grids == [[1, 10, 22]]


def test_onnx_vision_graph_is_one_graph_for_any_size(qwen):
    """One ONNX graph, dynamic patch (and window) axes, no control flow, every op in the lint table."""
    import onnx

    from dyvte.engines.lint import lint_folder
    from dyvte.engines.manifest import Manifest

    g = onnx.load(qwen.engine_dir / "onnx" / "vision.onnx", load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    assert inputs["pixel_values"] == ["patches", 96] and inputs["rotary_pos"] == ["patches", 2]
    if qwen.spec.family == "qwen2_5_vl":
        assert inputs["window_index"] == ["windows", 36] and inputs["window_scatter"] == ["patches"]
    elif qwen.spec.family == "qwen3_vl":  # the position table's taps and weights; the features with DeepStack's
        assert inputs["interp_index"] == ["patches", 4] and inputs["interp_weight"] == ["patches", 4]
        assert set(inputs) == {"pixel_values", "rotary_pos", "interp_index", "interp_weight"}
        out = [d.dim_param or d.dim_value for d in g.output[0].type.tensor_type.shape.dim]
        assert out == ["tokens", 3, qwen.spec.hidden_size]
    else:
        assert set(inputs) == {"pixel_values", "rotary_pos"}
    assert not {n.op_type for n in g.node} & {"If", "Loop", "Scan", "NonZero", "Conv", "Resize"}
    m = Manifest.load(qwen.engine_dir)
    assert m.data["validation"]["vision"]["max_abs_err"] < 1e-4
    assert lint_folder(m).ok
    seg = m.segments[0]
    assert seg.inputs[1] == {"name": "position_ids", "shape": [3, "batch", "seq"], "dtype": "int64"}
    assert m.text["mrope_section"] == [2, 3, 3]
