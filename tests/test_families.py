"""Model families beyond LLaVA-1.5 (LLaVA-NeXT, InternVL3, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3): images of different
sizes, several images per prompt, the run-time packing against Hugging Face, bad inputs, and every command
(train-gates, calibrate-vtw, eval, profile, lint) end to end. The generic equivalence tests
(never vs HF generate, layer:K vs the reference, gate vs Eq. 1, torch vs ONNX Runtime) run on these
families too through the ``tiny`` fixture."""

import json

import numpy as np
import pytest
import torch

from conftest import IMAGE_SIZES, MODELS, make_image
from reference import generate_with_exit

FAMILIES = ["llava_next", "internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3"]
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
QUESTIONS = ["what color is the circle ?", "how many red squares are there in the picture ?", "is there a blue triangle ?",
             "which shape is on the left ?"]


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tiny_models):
    return tiny_models(request.param)


def test_every_family_has_a_tiny_fixture():
    from dyvte.families import families

    assert {spec.get("family", "llava") for spec, _, _ in MODELS.values()} == set(families())


def test_presets_resolve():
    from dyvte.presets import resolve_preset

    assert resolve_preset("llava-next-7b") == "llava-hf/llava-v1.6-mistral-7b-hf"
    assert resolve_preset("llava-next-13b") == "llava-hf/llava-v1.6-vicuna-13b-hf"
    for size in ("1b", "2b", "8b"):
        assert resolve_preset(f"internvl3-{size}") == f"OpenGVLab/InternVL3-{size.upper()}-hf"
    assert resolve_preset("qwen2-vl-2b") == "Qwen/Qwen2-VL-2B-Instruct"
    for size in ("3b", "7b"):
        assert resolve_preset(f"qwen2.5-vl-{size}") == f"Qwen/Qwen2.5-VL-{size.upper()}-Instruct"
    for size in ("2b", "4b", "8b"):
        assert resolve_preset(f"qwen3-vl-{size}") == f"Qwen/Qwen3-VL-{size.upper()}-Instruct"
    for size in ("4b", "12b", "27b"):
        assert resolve_preset(f"gemma-3-{size}") == f"google/gemma-3-{size}-it"


def test_visual_tokens_vary_with_image_size(fam, pipelines):
    pipe = pipelines(fam.engine_dir)
    sizes = [*IMAGE_SIZES, (20, 20), (120, 30)]
    counts = {pipe.encode(make_image(0, size), "what ?").vision_inputs()["pixel_values"].shape for size in sizes}
    tokens = {pipe.run([pipe.encode(make_image(0, size), "what ?", 1)], policy="never")[0].visual_tokens
              for size in sizes}
    if fam.spec.family == "gemma3":  # every image is resized to the tower's size: always 16 tokens
        assert tokens == {fam.spec.num_visual_tokens} and len(counts) == 1
        return
    assert len(tokens) >= 3 and len(counts) >= 2


def test_packed_features_equal_hf(fam, pipelines):
    """Vision graph + run-time packing (unpadding, newlines, tile order) = HF get_image_features."""
    pipe = pipelines(fam.engine_dir)
    family = pipe.family
    for i, size in enumerate([*IMAGE_SIZES, (100, 20), (20, 100), (7, 300)]):
        req = pipe.encode(make_image(i, size), "what ?")
        vision = family.prepare(pipe.vision_meta, req.vision_inputs())
        ours = pipe.dispatcher.visual_features([vision])
        with torch.no_grad():
            ref = family.hf_visual_features(fam.hf, {k: torch.as_tensor(v) for k, v in req.vision_inputs().items()})
        if isinstance(ref, dict):  # DeepStack (Qwen3-VL): the features and the per-layer DeepStack features
            assert ours.keys() == ref.keys() == {"features", "deepstack"}
            assert ours["deepstack"].shape == ref["deepstack"].shape == (vision.tokens, 2, fam.spec.hidden_size)
            np.testing.assert_allclose(ours["deepstack"].numpy(), ref["deepstack"].numpy(), atol=1e-5, rtol=0)
            ours, ref = ours["features"], ref["features"]
        assert ours.shape == ref.shape == (vision.tokens, fam.spec.hidden_size), size
        np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-5, rtol=0, err_msg=str(size))


def test_batch_mixing_image_sizes_equals_each_alone(fam, pipelines):
    pipe = pipelines(fam.engine_dir)
    images = [make_image(s, IMAGE_SIZES[s % len(IMAGE_SIZES)]) for s in range(4)]
    for policy, thr in (("gate", 0.5), ("gate", 0.9), (f"layer:{fam.candidates[1]}", 0.5)):
        batch = pipe.generate(images, QUESTIONS, max_new_tokens=5, policy=policy, gate_threshold=thr, return_logits=True)
        assert len({r.visual_tokens for r in batch}) >= 2 or fam.spec.family == "gemma3"  # really different sizes
        for b, img, q in zip(batch, images, QUESTIONS):
            a = pipe.generate(img, q, max_new_tokens=5, policy=policy, gate_threshold=thr, return_logits=True)
            assert (b.exit_layer, b.token_ids) == (a.exit_layer, a.token_ids)
            np.testing.assert_allclose(b.logits, a.logits, atol=1e-4, rtol=0)


def test_two_images_in_one_prompt(fam, pipelines):
    """A prompt with two images of different sizes: never = HF generate, layer:K = the reference."""
    pipe = pipelines(fam.engine_dir)
    imgs = [make_image(1, (90, 40)), make_image(2, (40, 52))]
    req = pipe.encode_chat([{"role": "user", "content": [{"type": "image", "image": imgs[0]}, {"type": "text", "text": "and"},
                                                         {"type": "image", "image": imgs[1]},
                                                         {"type": "text", "text": "what color ?"}]}], 6)
    vision = {k: torch.as_tensor(v) for k, v in req.vision_inputs().items()}
    ids = req.input_ids[None]
    with torch.no_grad():
        out = fam.hf.generate(input_ids=ids, **vision, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                              do_sample=False)
    res = pipe.run([req], policy="never")[0]
    assert res.token_ids == out[0, ids.shape[1]:].tolist()
    k = fam.candidates[0]
    ref, _ = generate_with_exit(fam.hf, ids, vision, k, 6, pipe.manifest.model["eos_token_ids"])
    assert pipe.run([req], policy=f"layer:{k}")[0].token_ids == ref


def test_bad_inputs(fam, pipelines):
    from dyvte.errors import InputError

    pipe = pipelines(fam.engine_dir)
    req = pipe.encode(make_image(0, (90, 40)), "what ?", 2)
    ids = req.input_ids[None].numpy()
    px = req.pixel_values.numpy()
    with pytest.raises(InputError, match="pixel_values must have"):
        pipe.generate_ids(ids, px[..., :-1], **{k: v.numpy() for k, v in req.extra.items()})
    with pytest.raises(InputError, match="no pixel_values were given|holds .* image tokens but no images"):
        pipe.generate_ids(ids, None)
    if fam.spec.family == "llava_next":
        with pytest.raises(InputError, match="needs image_sizes"):
            pipe.generate_ids(ids, px)
        with pytest.raises(InputError, match="image_sizes has 2 rows for 1 images"):
            pipe.generate_ids(ids, px, image_sizes=np.array([[40, 90], [40, 90]]))
        with pytest.raises(InputError, match="image tokens, which no run of the given images makes"):
            pipe.generate_ids(ids, px, image_sizes=np.array([[300, 20]]))  # another size: another token count
        with pytest.raises(InputError, match="needs .* tiles, pixel_values has"):
            pipe.generate_ids(ids, px[:, :2], image_sizes=np.array([[40, 90]]))
        with pytest.raises(InputError, match="non-positive"):
            pipe.generate_ids(ids, px, image_sizes=np.array([[0, 90]]))
    elif fam.spec.family in QWEN:
        grid = req.extra["image_grid_thw"].numpy()
        with pytest.raises(InputError, match="needs image_grid_thw"):
            pipe.generate_ids(ids, px)
        with pytest.raises(InputError, match="describes .* patches but pixel_values has"):
            pipe.generate_ids(ids, px[:-4], image_grid_thw=grid)
    elif fam.spec.family == "gemma3":
        types = req.extra["token_type_ids"].numpy()
        with pytest.raises(InputError, match=r"got 2 images but the prompts hold 1 image\(s\)"):
            pipe.generate_ids(ids, np.concatenate([px, px]), token_type_ids=types)
        with pytest.raises(InputError, match="token_type_ids marks 3 image tokens but its 1 image"):
            pipe.generate_ids(ids, px, token_type_ids=np.pad(np.ones((1, 3), np.int64), ((0, 0), (0, ids.shape[1] - 3))))
        pipe.generate_ids(ids, px, max_new_tokens=1)  # token_type_ids are optional (the image tokens mark them)
    else:
        with pytest.raises(InputError, match=r"got \d+ tiles but the prompts hold \d+ tile\(s\)"):
            pipe.generate_ids(ids, px[:-1])
    other = "image_sizes" if fam.spec.family in QWEN else "image_grid_thw"
    with pytest.raises(InputError, match="not an input of"):
        pipe.generate_ids(ids, px, **{other: np.ones((1, 3))}, **{k: v.numpy() for k, v in req.extra.items()})


def test_more_tiles_than_the_exported_limit(fam, tmp_path, pipelines):
    from dyvte.errors import InputError
    from dyvte.exporter import ExportSettings, export
    from dyvte.runtime import Pipeline

    if fam.spec.family in QWEN:
        pytest.skip("Qwen-VL: a tile is a whole image; its limit is --max-pixels (tests/test_qwen_vl.py)")
    if fam.spec.family == "gemma3":
        pytest.skip("Gemma 3: one tile per image without pan-and-scan; its limit counts images (tests/test_gemma3.py)")
    out = export(ExportSettings(out=tmp_path / "e", model=str(fam.model_dir), candidates=fam.candidates, max_tiles=3,
                                max_input_len=256, max_new_tokens=8, progress=False, validate=False))
    pipe = Pipeline.load(out, backend="onnxruntime")
    assert pipe.vision_meta["max_tiles"] == 3
    few, many = ((20, 20), (90, 30)) if fam.spec.family == "internvl" else ((60, 30), (64, 64))
    pipe.generate(make_image(0, few), "what ?", max_new_tokens=1)  # 1 (InternVL) or 3 (NeXT) tiles: fine
    with pytest.raises(InputError, match=r"make [45] tiles; this engine folder takes at most 3 per prompt.*--max-tiles"):
        pipe.generate(make_image(0, many), "what ?", max_new_tokens=1)
    meta = pipe.vision_meta
    assert pipe.family.default_max_tiles(meta, 256) == meta["tiles_per_image"] > 2  # default: one image's maximum


def test_processor_folder_is_standard(fam):
    data = json.loads((fam.engine_dir / "processor" / "processor_config.json").read_text())
    assert data["processor_class"] == {"llava_next": "LlavaNextProcessor", "internvl": "InternVLProcessor",
                                       "qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                                       "qwen3_vl": "Qwen3VLProcessor", "gemma3": "Gemma3Processor"}[fam.spec.family]


def test_commands_end_to_end(fam, synth_data, tmp_path):
    """train-gates, export with them, calibrate-vtw, eval (family FLOPs), profile and lint."""
    from dyvte.engines.lint import lint_folder
    from dyvte.engines.manifest import Manifest
    from dyvte.engines.profile import profile
    from dyvte.evaluate import evaluate
    from dyvte.exporter import ExportSettings, export
    from dyvte.gate_training import GateTrainSettings, train_gates
    from dyvte.vtw import calibrate_vtw

    data, root = synth_data
    gates = tmp_path / "gates.safetensors"
    report = train_gates(GateTrainSettings(out=gates, model=str(fam.model_dir), data=data, image_root=root,
                                           candidates=fam.candidates, samples=8, epochs=1, lr=1e-3, batch_size=4,
                                           forward_batch=4, hidden=8, shard_size=8, progress=False))
    assert report["samples"] == 8 and set(report["positive_rate"]) == set(fam.candidates)
    out = export(ExportSettings(out=tmp_path / "e", model=str(fam.model_dir), candidates=fam.candidates, gates=gates,
                                max_input_len=256, max_new_tokens=8, progress=False))
    cal = calibrate_vtw(out, data, root, samples=3, eta=1e9, backend="onnxruntime", progress=False)
    assert cal["exit_layer"] == fam.candidates[0]
    summary, rows = evaluate(out, data, root, ["never", "gate", "vtw", "layer:0"], "onnxruntime", 4, 3, progress=False)
    assert summary["never"]["mean_exit_layer"] == fam.spec.num_layers
    assert summary["layer:0"]["tflops"] < summary["vtw"]["tflops"] < summary["never"]["tflops"]
    assert len({r["prompt_tokens"] for r in rows}) >= 2  # images of different sizes: different prompts
    res = profile(out, "onnxruntime", reps=1, text_tokens=4, decode_tokens=2, progress=False)
    assert res["visual_tokens"] > 0 and res["end_to_end"]["never"]["prefill_gflops"] > 0
    assert lint_folder(Manifest.load(out)).ok


@pytest.mark.parametrize("name", ["qwen3_vl", "gemma3"])
def test_serve_and_triton_answer_as_the_pipeline(name, tiny_models, pipelines):
    """dyvte serve (OpenAI chat, an image URL part) and the Triton model run the new families
    unchanged and answer as the Pipeline does."""
    from test_serve import ServerThread, png_bytes, user

    from dyvte.serving.triton import TritonModel

    fam = tiny_models(name)
    pipe = pipelines(fam.engine_dir)
    img = make_image(2, (90, 40))
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": QUESTIONS[0]}]}]
    want = pipe.run([pipe.encode_chat(messages, 5)], "gate")[0]
    srv = ServerThread(pipe, max_wait_ms=10)
    try:
        res = srv.client().chat.completions.create(model=srv.app.state.dyvte.model_name,
                                                   messages=user(QUESTIONS[0], img), max_tokens=5)
    finally:
        srv.stop()
    assert res.choices[0].message.content == want.text and res.dyvte["exit_layer"] == want.exit_layer
    model = TritonModel(pipe, policy="gate")
    try:
        out = model.execute([{"PROMPT": np.array([[QUESTIONS[0].encode()]], dtype=object),
                              "IMAGE": np.frombuffer(png_bytes(img), np.uint8)[None],
                              "MAX_TOKENS": np.array([[5]], np.int32)}], timeout=60)
    finally:
        model.worker.close()  # the pipeline is the test session's
    assert out[0]["TEXT"][0, 0].decode() == pipe.generate(img, QUESTIONS[0], 5, "gate").text


@pytest.mark.parametrize("name", ["qwen3_vl", "gemma3"])
def test_training_side_exits_equal_the_reference(name, tiny_models):
    """Gate training's batched exit runs (dyvte/exits.py: right padding, the family's masks and
    DeepStack) give the reference's teacher-forced logits for each sample, at every exit."""
    from reference import teacher_forced

    from dyvte.data import Batcher, QA
    from dyvte.exits import ExitModel
    from dyvte.models import load_processor

    fam = tiny_models(name)
    em = ExitModel(fam.hf)
    batcher = Batcher(load_processor(fam.model_dir), em.family)
    samples = [QA(make_image(s, size), q, "red", "color") for s, (size, q) in
               enumerate([((90, 40), QUESTIONS[0]), ((40, 52), QUESTIONS[1])])]
    batch = batcher(samples)
    for k in (1, 2, fam.spec.num_layers):
        with torch.no_grad():
            logits, index, mask = em.forward(batch.input_ids, batch.vision, batch.attention_mask, k)
        for i, s in enumerate(samples):
            n = int(batch.attention_mask[i].sum())
            ids = batch.input_ids[i: i + 1, :n]
            vision = batcher.encode(s.question, s.answer, s.image)[2]
            ref, _ = teacher_forced(fam.hf, ids, vision, k)  # rows: the tokens kept, in order
            ours = logits[i, mask[i].bool()]
            kept = index[i, mask[i].bool()]
            assert len(kept) == len(ref)
            if k < fam.spec.num_layers:  # an exit: no visual token left
                assert not (batch.input_ids[i, kept] == em.image_token_id).any()
            torch.testing.assert_close(ours, ref, atol=2e-4, rtol=0)
