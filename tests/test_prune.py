"""Visual-token pruning (runtime/plan.py, runtime/dispatch.py): DivPrune before layer 0 and FastV at
segment boundaries, composed with every exit policy, against the independent reference on the HF
model (tests/reference.py), on every family and on ONNX Runtime and torch; batches and in-flight
joins where rows prune and exit differently; export with --prune-layers; bad specs; FLOPs.

The fixtures' decoders have 6 layers, candidates 2 and 4 (gates there) and --prune-layers 1, 3,
and their query/key projections are scaled up so that attention is far from uniform (FastV's
ranking then means something, and the runtime and the reference rank alike)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import IMAGE_SIZES, MODELS, make_image
from reference import TokenPlan, divprune_pick, fastv_pick, gate_exit, generate_with_plan

FAMILIES = ["llama_gqa", "llava_next", "internvl", "qwen2_vl", "qwen2_5_vl"]
NUM_LAYERS, CANDIDATES, PRUNE_LAYERS, VTW_LAYER = 6, [2, 4], [1, 3], 4
QK_SCALE = {"llama_gqa": 4.0, "llava_next": 2.5, "internvl": 2.5, "qwen2_vl": 3.0, "qwen2_5_vl": 3.0}
QUESTIONS = ["what color is the circle ?", "how many red squares are there in the picture ?",
             "is there a blue triangle ?", "which shape is on the left ?"]


def build_prune_model(name: str, root):
    """A tiny model of family ``name`` (conftest.MODELS shape, 6 layers) with q/k projections of the
    decoder scaled by QK_SCALE, exported with candidates 2, 4, prune layers 1, 3, gates and a VTW
    calibration at layer 4. Returns (engine dir, HF model, gates)."""
    from safetensors.torch import load_file, save_file

    from dyvte.exporter import ExportSettings, export
    from dyvte.gates import save_gates
    from dyvte.models import load_model
    from dyvte.tiny import TinyLlavaSpec, build_tiny_llava

    kwargs = dict(MODELS[name][0], num_layers=NUM_LAYERS)
    spec = TinyLlavaSpec(**kwargs)
    model_dir = build_tiny_llava(spec, root / f"{name}-hf", seed=2)
    weights = model_dir / "model.safetensors"
    state = load_file(str(weights))
    for key in state:
        if re.search(r"layers\.\d+\.self_attn\.[qk]_proj\.", key) and "vision" not in key and "visual" not in key:
            state[key] = state[key] * QK_SCALE[name]
    save_file(state, str(weights), metadata={"format": "pt"})
    hf = load_model(model_dir)
    gates = _gates(hf, model_dir, spec.hidden_size)
    save_gates(root / "gates.safetensors", gates)
    engine = root / f"{name}-engine"
    tiled = spec.family != "llava"
    export(ExportSettings(out=engine, model=str(model_dir), candidates=CANDIDATES, prune_layers=PRUNE_LAYERS,
                          gates=root / "gates.safetensors", max_input_len=256, max_new_tokens=16,
                          max_tiles=12 if tiled else None, progress=False))
    mpath = engine / "manifest.json"
    data = json.loads(mpath.read_text())
    data["calibration"] = {"vtw": {"exit_layer": VTW_LAYER, "eta": 0.003, "samples": 0, "mean_kl": {}}}
    mpath.write_text(json.dumps(data))
    return engine, hf, gates


def _gates(hf, model_dir, dim: int, hidden: int = 16) -> dict:
    """Random gates scaled to the model's hidden-state norms at each candidate, so that their exit
    probabilities spread over (0, 1) instead of saturating."""
    from reference import _merged_embeddings, _positions, forward_plan

    from dyvte.models import load_processor
    from dyvte.runtime.inputs import encode

    ids, vision = encode(load_processor(model_dir), make_image(0), QUESTIONS[0])
    vision = {k: torch.as_tensor(v) for k, v in vision.items()}
    embeds, visual = _merged_embeddings(hf, ids[None], vision)
    with torch.no_grad():
        _, entering, _ = forward_plan(hf, embeds, _positions(hf, ids[None], vision)[0], visual, TokenPlan(NUM_LAYERS))
    g = torch.Generator().manual_seed(3)
    gates = {}
    for k in CANDIDATES:
        norm = float(entering[k][0][0].norm(dim=-1).mean())  # typical token norm entering layer k
        gates[k] = (torch.randn(hidden, 2 * dim, generator=g) / (norm * 2**0.5), torch.randn(2, hidden, generator=g))
    return gates


class PruneModel:
    """One family's pruning fixture: engine folder, HF model, gates, pipelines per backend."""

    def __init__(self, name, engine, hf, gates):
        self.name, self.engine, self.hf, self.gates = name, engine, hf, gates
        self._pipes, self._ref = {}, {}

    def pipe(self, backend: str):
        from dyvte.runtime import Pipeline

        if backend not in self._pipes:
            opts = {"device": "cpu"} if backend == "torch" else {}
            self._pipes[backend] = Pipeline.load(self.engine, backend=backend, **opts)
        return self._pipes[backend]

    def reference(self, key, fn):
        """Reference results are computed once per fixture and shared by the backends."""
        if key not in self._ref:
            self._ref[key] = fn()
        return self._ref[key]

    def close(self):
        for p in self._pipes.values():
            p.close()


@pytest.fixture(scope="module")
def prune_models(tmp_path_factory):
    """Builds each family's pruning fixture once per module."""
    cache = {}

    def get(name: str) -> PruneModel:
        if name not in cache:
            cache[name] = PruneModel(name, *build_prune_model(name, tmp_path_factory.mktemp(f"prune-{name}")))
        return cache[name]

    yield get
    for m in cache.values():
        m.close()


@pytest.fixture(scope="module", params=FAMILIES)
def pm(request, prune_models) -> PruneModel:
    return prune_models(request.param)


@pytest.fixture(scope="module")
def llama_pm(prune_models) -> PruneModel:
    return prune_models("llama_gqa")


def _inputs(pipe, seed: int, question: str):
    """(request, ids [1,T], the processor's image tensors as torch) for one image and question."""
    req = pipe.encode(make_image(seed, IMAGE_SIZES[seed % len(IMAGE_SIZES)]), question)
    vision = {k: torch.as_tensor(v) for k, v in req.vision_inputs().items()}
    return req, req.input_ids[None], vision


def _present_per_segment(hf, ids, vision, plan, manifest):
    """Prompt tokens the reference leaves at the first layer of each segment."""
    from reference import _merged_embeddings, _positions, forward_plan

    embeds, visual = _merged_embeddings(hf, ids, vision)
    with torch.no_grad():
        _, entering, _ = forward_plan(hf, embeds, _positions(hf, ids, vision)[0], visual, plan)
    return [len(entering[seg.layers[0]][1]) for seg in manifest.segments]


#: (policy, spec): each stage alone, at a prune-only boundary (1, 3) and at a candidate (2, 4);
#: both methods; stages before, at and after a fixed exit; the gate and VTW with pruning.
CASES = [("never", "divprune:0.5"), ("never", "fastv:1:0.5"), ("never", "fastv:2:0.75"),
         ("never", "divprune:0.3,fastv:3:0.6"), ("layer:4", "divprune:0.5,fastv:1:0.5"), ("layer:2", "fastv:2:0.5"),
         ("layer:2", "fastv:3:0.5"), ("layer:0", "divprune:0.5"), ("vtw", "fastv:1:0.7"), ("gate", "divprune:0.4"),
         ("gate", "fastv:1:0.6,divprune:0.25")]
N_NEW = 6


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_prune_matches_reference(pm, backend):
    pipe = pm.pipe(backend)
    L, eos = pipe.num_layers, pipe.manifest.model["eos_token_ids"]
    req, ids, vision = _inputs(pipe, 1, QUESTIONS[1])
    req.max_new_tokens = N_NEW
    V = int((req.input_ids == pipe.manifest.model["image_token_id"]).sum())
    for policy, spec in CASES:
        thresholds = [0.5]
        if policy == "gate":  # thresholds between the reference's probabilities: exits at each candidate
            _, probs = pm.reference(("probs", spec), lambda: gate_exit(pm.hf, pm.gates, CANDIDATES, ids, vision,
                                                                       threshold=1.1, prune=spec))
            values = sorted(probs.values())
            thresholds = [(a + b) / 2 for a, b in zip([0.0, *values], [*values, 1.0]) if b - a > 1e-3]
        exits = set()
        for thr in thresholds:
            if policy == "gate":
                k, probs = pm.reference(("gate", spec, thr), lambda: gate_exit(pm.hf, pm.gates, CANDIDATES, ids, vision,
                                                                               thr, prune=spec))
            else:
                k = {"never": L, "vtw": VTW_LAYER}.get(policy) or int(policy.split(":")[1])
            plan = TokenPlan.from_spec(k, spec)
            tokens, logits = pm.reference(("gen", k, spec), lambda: generate_with_plan(pm.hf, ids, vision, plan, N_NEW,
                                                                                       eos))
            res = pipe.run([req], policy=policy, gate_threshold=thr, prune=spec, return_logits=True)[0]
            where = f"{pm.name} {backend} {policy} {spec} thr={thr:.3f}"
            assert res.exit_layer == k, where
            assert res.token_ids == tokens, where
            np.testing.assert_allclose(res.logits, logits.numpy(), atol=3e-4, rtol=0, err_msg=where)
            if policy == "gate":
                assert res.gate_probs.keys() == probs.keys(), where
                for c, p in probs.items():
                    assert res.gate_probs[c] == pytest.approx(p, abs=1e-5), where
            present = pm.reference(("present", k, spec),
                                   lambda: _present_per_segment(pm.hf, ids, vision, plan, pipe.manifest))
            assert res.segment_tokens == present, where
            assert res.prune == spec or set(res.prune.split(",")) == set(spec.split(",")), where
            exits.add(k)
        if policy == "gate":
            assert len(exits) >= 2, (pm.name, spec, thresholds)  # the gate really exits at different layers
    # pruning changed the computation (else the comparisons above prove little)
    never = pipe.run([req], policy="never", return_logits=True)[0]
    pruned = pipe.run([req], policy="never", prune="fastv:1:0.5", return_logits=True)[0]
    assert np.abs(never.logits[0] - pruned.logits[0]).max() > 1e-3
    assert never.segment_tokens[0] == len(req.input_ids) and pruned.segment_tokens[1] == len(req.input_ids) - V + round(
        V * 0.5)


#: Per-request (policy, spec, threshold) of the mixed batches: every row prunes and exits its own way.
MIXED = [("gate", "divprune:0.5", 0.5), ("never", None, 0.5), ("layer:2", "fastv:1:0.5", 0.5),
         ("gate", "divprune:0.3,fastv:3:0.6", 0.2), ("vtw", "fastv:2:0.75", 0.5), ("never", "fastv:3:0.9", 0.5),
         ("layer:4", "divprune:0.8", 0.5)]


def _mixed_requests(pipe, n_new=(4, 7, 2, 5, 6, 3, 8)):
    reqs = []
    for i, (policy, spec, thr) in enumerate(MIXED):
        r = pipe.encode(make_image(i, IMAGE_SIZES[i % len(IMAGE_SIZES)]), QUESTIONS[i % len(QUESTIONS)] + " ?" * (i % 3),
                        max_new_tokens=n_new[i % len(n_new)])
        r.policy, r.prune, r.gate_threshold = policy, spec, thr
        reqs.append(r)
    return reqs


@pytest.mark.parametrize("name,backend", [*((f, "onnxruntime") for f in FAMILIES), ("llama_gqa", "torch"),
                                          ("qwen2_vl", "torch")])
def test_batch_rows_prune_and_exit_on_their_own(prune_models, name, backend):
    """One batch of rows with different specs, policies, image sizes and lengths: each row equals its
    single run (tokens, exit layer, tokens per segment, logits). torch: a 1-D RoPE and an M-RoPE
    family (the reference test covers every family on both backends)."""
    pipe = prune_models(name).pipe(backend)
    reqs = _mixed_requests(pipe)
    batch = pipe.run(reqs, return_logits=True)
    alone = [pipe.run([r], return_logits=True)[0] for r in reqs]
    assert len({tuple(r.segment_tokens) for r in batch}) >= 5 and len({r.exit_layer for r in batch}) >= 3
    for i, (b, a) in enumerate(zip(batch, alone)):
        assert (b.exit_layer, b.token_ids, b.segment_tokens, b.prune) == (a.exit_layer, a.token_ids, a.segment_tokens,
                                                                           a.prune), i
        np.testing.assert_allclose(b.logits, a.logits, atol=1e-4, rtol=0, err_msg=str(i))


@pytest.mark.parametrize("name,prefill_tokens", [("llama_gqa", None), ("qwen2_5_vl", 8)],
                         ids=["llama_gqa", "qwen2_5_vl-chunked"])
@pytest.mark.parametrize("backend,options", [("onnxruntime", {}), ("torch", {"device": "cpu", "reuse_caches": True})],
                         ids=["onnxruntime", "torch-pooled"])
def test_inflight_joins_with_different_specs(prune_models, name, prefill_tokens, backend, options):
    """Requests with their own specs joining a running batch at different steps answer as alone
    (a 1-D RoPE family with whole prefills, an M-RoPE family whose prefills, pruning stages
    included, are spread over several steps)."""
    from test_scheduler import _run_staggered

    from dyvte.runtime import Pipeline

    with Pipeline.load(prune_models(name).engine, backend=backend, **options) as pipe:
        n_new = (7, 3, 8, 5, 2, 6, 4) if prefill_tokens is None else (14, 6, 16, 10, 8, 12, 9)  # chunked: long rows
        reqs = _mixed_requests(pipe, n_new=n_new)
        alone = [pipe.run([r], return_logits=True)[0] for r in reqs]
        results, sizes, split = _run_staggered(pipe, reqs, [0, 0, 1, 3, 3, 5, 8], prefill_tokens=prefill_tokens)
        assert max(sizes) >= 3 and (split > 0) == (prefill_tokens is not None)
        for i, (got, want) in enumerate(zip(results, alone)):
            assert (got.token_ids, got.exit_layer, got.segment_tokens) == (want.token_ids, want.exit_layer,
                                                                           want.segment_tokens), i
            np.testing.assert_allclose(got.logits, want.logits, atol=1e-4, rtol=1e-4, err_msg=str(i))


def test_rows_that_cannot_exit_are_not_pruned(llama_pm):
    """A prompt ending with its image tokens (its last token gives the first generated one, and
    FastV has no query after the image) and a prompt without an image keep every token under every
    spec, also in a batch with rows that do prune."""
    from dyvte.runtime.pipeline import Request

    pipe = llama_pm.pipe("onnxruntime")
    image_id = pipe.manifest.model["image_token_id"]
    req, _, _ = _inputs(pipe, 0, QUESTIONS[0])
    V = int((req.input_ids == image_id).sum())
    ends = Request(torch.cat([torch.tensor([2, 6, 7]), torch.full((V,), image_id)]), req.pixel_values, 3)
    text = Request(torch.tensor([2, 6, 7, 8, 9, 10]), None, 3)
    for spec in ("divprune:0.5", "fastv:1:0.5", "divprune:0.5,fastv:3:0.5"):
        for r in (ends, text):
            want = pipe.run([r], policy="never", return_logits=True)[0]
            got = pipe.run([r], policy="gate", prune=spec, gate_threshold=0.0, return_logits=True)[0]
            assert got.segment_tokens == want.segment_tokens == [len(r.input_ids)] * 5 and got.exit_layer == 6
            np.testing.assert_allclose(got.logits, want.logits, atol=1e-5)
        mixed = pipe.run([req, ends, text], policy="never", prune=spec)
        assert mixed[0].segment_tokens != [len(req.input_ids)] * 5
        assert mixed[1].segment_tokens == [len(ends.input_ids)] * 5


@pytest.mark.parametrize("spec,match", [
    ("topk:0.5", "unknown pruning method 'topk'.*use divprune:R, fastv:K:R"),
    ("divprune:1.5", "R = 1.5 is outside \\(0, 1\\); give the share"),
    ("divprune:0", "R = 0 is outside \\(0, 1\\)"),
    ("fastv:2:1", "R = 1 is outside"),
    ("divprune:x", "R must be a number in \\(0, 1\\)"),
    ("fastv:5:0.5", "segments start only at layers 1, 2, 3, 4; use one of them or re-export with --prune-layers 5"),
    ("fastv:6:0.5", "K = 6 must be in \\[1, 5\\]"),
    ("fastv:0:0.5", "K = 0 must be in \\[1, 5\\]"),
    ("fastv:two:0.5", "K must be an integer layer"),
    ("fastv:2", "malformed; use divprune:R"),
    ("divprune:0.5,divprune:0.2", "names divprune twice"),
    ("fastv:2:0.5,fastv:2:0.3", "two fastv stages at layer 2"),
])
def test_bad_specs_are_one_line_errors(llama_pm, spec, match):
    from dyvte.errors import InputError

    pipe = llama_pm.pipe("onnxruntime")
    req, _, _ = _inputs(pipe, 0, QUESTIONS[0])
    with pytest.raises(InputError, match=match) as err:
        pipe.run([req], prune=spec)
    assert "\n" not in str(err.value)
    req.prune = spec  # a request's own spec is checked the same way
    with pytest.raises(InputError, match=match):
        pipe.run([req])


def test_cli_run_and_inspect_with_prune(llama_pm, image_file):
    from click.testing import CliRunner

    from dyvte.cli import main

    pm = llama_pm
    args = ["run", "--engine-dir", str(pm.engine), "--image", str(image_file), "--prompt", "what color ?",
            "--max-new-tokens", "3", "--backend", "onnxruntime"]
    res = CliRunner().invoke(main, [*args, "--prune", "divprune:0.5,fastv:3:0.5", "--policy", "never", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["prune"] == "divprune:0.5,fastv:3:0.5" and out["segment_tokens"][0] > out["segment_tokens"][-1]
    res = CliRunner().invoke(main, [*args, "--prune", "fastv:5:0.5"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "--prune-layers 5" in res.output
    res = CliRunner().invoke(main, ["inspect", str(pm.engine)])
    assert "prune layers   [1, 3]" in res.stdout and "[1, 2, 3, 4]" in res.stdout


def test_selection_rules_and_ties():
    """fastv_keep / divprune_keep against the reference's own implementations, on random rows and on
    exact ties (equal scores, duplicated rows: the earlier wins), and kept counts round(n (1 - R))."""
    from dyvte.runtime.plan import divprune_keep, fastv_keep, kept_count

    g = torch.Generator().manual_seed(0)
    for n, share in [(1, 0.5), (2, 0.5), (7, 0.3), (25, 0.5), (40, 0.75), (50, 0.9), (3, 0.9), (5, 0.5)]:
        assert kept_count(n, share) == round(n * (1 - share))
        scores = torch.rand(n, generator=g)
        feats = torch.randn(n, 16, generator=g)
        assert fastv_keep(scores, share).nonzero()[:, 0].tolist() == fastv_pick(scores, share)
        assert divprune_keep(feats, share).nonzero()[:, 0].tolist() == divprune_pick(feats, share)
    # ties: equal scores keep the earlier positions (7 x 0.5 = 3.5 rounds to 4, half to even)
    scores = torch.tensor([0.1, 0.3, 0.3, 0.2, 0.3, 0.0, 0.2])
    assert fastv_pick(scores, 0.5) == fastv_keep(scores, 0.5).nonzero()[:, 0].tolist() == [1, 2, 3, 4]
    assert fastv_pick(torch.zeros(6), 0.5) == fastv_keep(torch.zeros(6), 0.5).nonzero()[:, 0].tolist() == [0, 1, 2]
    # duplicated rows (distance 0 to their copy): row 3, the only one without a copy, is the first pick;
    # an original and its copy tie, and the original (earlier) wins
    base = torch.randn(4, 8, generator=g)
    feats = torch.cat([base, base[[0, 2, 1]]])  # rows 4, 5, 6 repeat rows 0, 2, 1
    for share in (0.2, 0.4, 0.6):
        want = divprune_pick(feats, share)
        assert divprune_keep(feats, share).nonzero()[:, 0].tolist() == want, share
        if share >= 0.4:
            assert set(want) <= {0, 1, 2, 3} and 3 in want, (share, want)
    same = torch.ones(5, 3)  # every distance 0: the first rows
    assert divprune_pick(same, 0.4) == divprune_keep(same, 0.4).nonzero()[:, 0].tolist() == [0, 1, 2]


def test_export_with_prune_layers(llama, tmp_path, monkeypatch):
    """--prune-layers adds segment boundaries without gates or exits; the manifest, inspect and the
    lint show them; an interrupted export resumes with the parts whose layer ranges still match."""
    import dyvte.exporter.export_model as em
    from dyvte.engines.manifest import Manifest
    from dyvte.errors import InputError, PolicyError
    from dyvte.exporter import ExportSettings, export
    from dyvte.runtime import Pipeline

    class Interrupt(Exception):
        pass

    out, real, calls = tmp_path / "eng", em.validate, []

    def stop_at_head(part, *a, **k):
        calls.append(part.name)
        if part.name == "head":
            raise Interrupt()
        return real(part, *a, **k)

    base = dict(out=out, model=str(llama.model_dir), progress=False)
    monkeypatch.setattr(em, "validate", stop_at_head)
    with pytest.raises(Interrupt):
        export(ExportSettings(candidates=[1, 2], **base))
    # the same boundaries as prune layers: every segment is reused (keys are layer ranges)
    calls[:] = []
    monkeypatch.setattr(em, "validate", lambda part, *a, **k: calls.append(part.name) or real(part, *a, **k))
    export(ExportSettings(candidates=[2], prune_layers=[1], gates=llama.gates_file, **base))
    assert calls == ["gate", "head"]
    m = Manifest.load(out)
    assert (m.candidates, m.prune_layers, m.boundaries, m.gate_layers) == ([2], [1], [1, 2], [2])
    assert m.data["lint"]["errors"] == 0 and m.data["lint"]["warnings"] == 0
    outputs = [[o["name"] for o in seg.outputs if o["name"] == "attention_last"] for seg in m.segments]
    assert outputs == [["attention_last"], ["attention_last"], []]  # the last segment has no FastV layer after it
    with Pipeline.load(out, backend="onnxruntime") as pipe:
        res = pipe.generate(make_image(0), "what color ?", max_new_tokens=2, policy="gate", gate_threshold=0.0,
                            prune="fastv:1:0.5")
        assert res.exit_layer == 2 and set(res.gate_probs) == {2}  # no gate at a prune layer
        with pytest.raises(PolicyError, match="can exit only at 0, 2 or 4"):
            pipe.generate(make_image(0), "what color ?", policy="layer:1")
    with pytest.raises(InputError, match=r"--prune-layers \[4\] are outside \[1, 3\]"):
        export(ExportSettings(candidates=[2], prune_layers=[1, 4], overwrite=True, **base))


def test_flops_follow_the_tokens_each_layer_sees():
    from dyvte import flops

    t = {"num_layers": 6, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
         "intermediate_size": 160, "vocab_size": 100}
    segments = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 6)]
    T, V = 60, 40
    assert flops.layer_tokens(segments, [60, 60, 60, 60, 20]) == flops.exit_layer_tokens(6, T, V, 4)
    exit4 = flops.prefill_flops(t, T, V, 4)
    assert flops.plan_prefill_flops(t, flops.layer_tokens(segments, [60, 60, 60, 60, 20])) == exit4
    # divprune:0.5 then fastv:2:0.5 then an exit at 4: 40 -> 20 -> 10 -> 0 visual tokens
    tokens = flops.layer_tokens(segments, [40, 40, 30, 30, 20])
    layer = flops.decoder_layer_flops
    assert flops.plan_prefill_flops(t, tokens, head=False) == 2 * layer(t, 40) + 2 * layer(t, 30) + 2 * layer(t, 20)
    assert flops.plan_decode_flops(t, tokens, 3, head=False) == sum(
        layer(t, 1, n + s) for s in (1, 2) for n in tokens)
    assert flops.decode_flops(t, T, V, 4, 5) == flops.plan_decode_flops(t, flops.exit_layer_tokens(6, T, V, 4), 5)


def test_eval_with_prune_specs(synth_model, synth_data, tmp_path):
    """dyvte eval --prune: every listed policy runs with every spec; FLOPs are counted on the pruned
    token counts; the frontier table and plot."""
    from click.testing import CliRunner
    from PIL import Image

    from dyvte import flops
    from dyvte.cli import main
    from dyvte.engines.manifest import Manifest
    from dyvte.evaluate import evaluate, frontier_runs

    data, root = synth_data
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(main, ["eval", "--engine-dir", str(synth_model.engine_dir), "--data", str(data),
                                    "--image-root", str(root), "--max-samples", "6", "--policies", "never,gate",
                                    "--prune", "none", "--prune", "divprune:0.5", "--prune", "divprune:0.5,fastv:2:0.5",
                                    "--json", str(out), "--plots", str(tmp_path / "plots"), "--backend", "onnxruntime"])
    assert res.exit_code == 0, res.output
    summary = json.loads(out.read_text())
    assert list(summary) == ["never", "gate", "never+divprune:0.5", "gate+divprune:0.5",
                             "never+divprune:0.5,fastv:2:0.5", "gate+divprune:0.5,fastv:2:0.5"]
    d = {k: v["decoder_tflops"] for k, v in summary.items()}
    assert d["never+divprune:0.5,fastv:2:0.5"] < d["never+divprune:0.5"] < d["never"]
    assert summary["never+divprune:0.5"]["prune"] == "divprune:0.5" and summary["never"]["prune"] is None
    assert "front" in res.stdout and "gate+divprune" in res.stdout
    assert Image.open(tmp_path / "plots" / "accuracy_vs_decoder_flops.png").size[0] > 300
    # per-sample FLOPs are those of the run's own token counts
    m = Manifest.load(synth_model.engine_dir)
    _, rows = evaluate(synth_model.engine_dir, data, root, ["never"], "onnxruntime", 2, 3, prune=["fastv:1:0.75"],
                       progress=False)
    from dyvte.runtime import Pipeline
    from dyvte.data import records_to_qa
    from dyvte.synth import load_records

    qa = records_to_qa(load_records(data), root, 2)
    with Pipeline.load(synth_model.engine_dir, backend="onnxruntime") as pipe:
        for row, s in zip(rows, qa):
            r = pipe.generate(s.image, s.question, max_new_tokens=3, policy="never", prune="fastv:1:0.75")
            tokens = flops.layer_tokens([seg.layers for seg in m.segments], r.segment_tokens)
            want = flops.plan_prefill_flops(m.text, tokens, head=False) + flops.plan_decode_flops(
                m.text, tokens, len(r.token_ids), head=False)
            assert row["decoder_tflops"] == pytest.approx(want / 1e12) and tokens[0] > tokens[1]
    assert ("gate", "divprune:0.5") in frontier_runs(m) and ("never", "fastv:1:0.9") in frontier_runs(m)


def _script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_prune_small(tmp_path, capsys):
    out = tmp_path / "prune.json"
    _script("bench_prune").main(["--workdir", str(tmp_path), "--hidden", "64", "--layers", "8", "--reps", "1",
                                 "--json", str(out)])
    text = capsys.readouterr().out
    assert "largest |time ratio / FLOPs ratio - 1|" in text and "fastv:2:0.75 + layer:4" in text
    res = json.loads(out.read_text())
    tokens = res["segment_tokens"]
    assert tokens["never"] == [616] * 8 and tokens["divprune:0.75"] == [184] * 8
    assert tokens["fastv:2:0.75"][:2] == [616, 616] and tokens["fastv:2:0.75 + layer:4"][4:] == [40] * 4
    g = res["gflops"]
    assert g["fastv:2:0.75 + layer:4"] < g["fastv:2:0.75"] < g["never"] and res["selection_s"]["divprune:0.75"][0] > 0
    from dyvte.runtime import dispatch
    from dyvte.runtime.plan import divprune_keep

    assert dispatch.divprune_keep is divprune_keep  # the timing wrappers are gone


def test_finetune_demo_prune_small(tmp_path):
    from dyvte.models import load_model

    out = tmp_path / "ft"
    _script("finetune_demo_prune").main(["--out", str(out), "--steps", "2", "--batch", "4", "--train-samples", "16",
                                         "--prune-prob", "1.0"])
    assert (out / "model.safetensors").is_file() and json.loads((out / "training_log.json").read_text())["args"]
    load_model(out)
