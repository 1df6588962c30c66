"""dyvte train-gates: labels match an independent computation, output format, resume."""

import json

import pytest
import torch

from dyvte.gate_training import GateTrainSettings, train_gates
from reference import teacher_forced


def _settings(synth_model, synth_data, out, **kw):
    data, root = synth_data
    base = dict(out=out, model=str(synth_model.model_dir), data=data, image_root=root, candidates=[1, 2, 3], samples=20,
                epochs=3, lr=1e-3, batch_size=8, forward_batch=4, hidden=16, shard_size=8, checkpoint_every=1,
                progress=False)
    base.update(kw)
    return GateTrainSettings(**base)


@pytest.fixture(scope="module")
def trained(synth_model, synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("gates") / "gates.safetensors"
    report = train_gates(_settings(synth_model, synth_data, out))
    return out, report


def test_output_contract(trained, synth_model):
    from dyvte.gates import load_gates

    out, report = trained
    gates = load_gates(out, [1, 2, 3], synth_model.spec.hidden_size)
    assert set(gates) == {1, 2, 3}
    assert gates[2][0].shape == (16, 2 * synth_model.spec.hidden_size) and gates[2][1].shape == (2, 16)
    assert report["samples"] == 20 and set(report["positive_rate"]) == {1, 2, 3}
    assert all(0 <= v <= 1 for v in report["positive_rate"].values())
    assert json.loads(open(str(out) + ".json").read())["candidates"] == [1, 2, 3]


def test_labels_match_reference(trained, synth_model, synth_data):
    from safetensors.torch import load_file

    from dyvte.data import Batcher, records_to_qa
    from dyvte.models import load_processor
    from dyvte.runtime.inputs import load_image
    from dyvte.synth import load_records

    out, _ = trained
    shard = load_file(str(out) + ".work/labels_0000000.safetensors")
    data, root = synth_data
    qa = records_to_qa(load_records(data), root, 8)
    proc = load_processor(synth_model.model_dir)
    from dyvte.families import family_named

    batcher = Batcher(proc, family_named("llava"))
    hf = synth_model.hf
    for i, s in enumerate(qa):
        ids, p, _ = batcher.encode(s.question, s.answer, load_image(s.image))
        ids = torch.tensor([ids])
        pixels = proc.image_processor([load_image(s.image)], return_tensors="pt")["pixel_values"]
        targets = ids[0, p:]  # answer tokens, predicted from positions p-1 .. T-2

        def stats(k):
            logits, pos = teacher_forced(hf, ids, pixels, k)
            rows = [int((pos == j).nonzero()) for j in range(p - 1, ids.shape[1] - 1)]
            lg = logits[rows]
            return lg.argmax(-1), torch.nn.functional.cross_entropy(lg, targets)

        pred_n, ce_n = stats(hf.config.text_config.num_hidden_layers)
        for j, k in enumerate([1, 2, 3]):
            pred_e, ce_e = stats(k)
            expected = bool((pred_e == pred_n).float().mean() > 0.99 and ce_e < 1.03 * ce_n)
            assert bool(shard["labels"][i, j]) == expected, (i, k)
    assert 0 < shard["labels"].float().mean() < 1, "degenerate labels make this test weak"


def test_deterministic_and_resumable(trained, synth_model, synth_data, tmp_path, monkeypatch):
    import dyvte.gate_training as gt
    from dyvte.gates import load_gates

    out = tmp_path / "g.safetensors"
    calls = {"n": 0}
    real = gt._gate_step

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gt, "_gate_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        train_gates(_settings(synth_model, synth_data, out))
    assert not out.exists()
    monkeypatch.setattr(gt, "_gate_step", real)
    logs = []
    train_gates(_settings(synth_model, synth_data, out, log=logs.append))
    assert any("resuming gate training at step 3" in m for m in logs), logs
    a, b = load_gates(out), load_gates(trained[0])
    for k in a:
        torch.testing.assert_close(a[k][0], b[k][0], atol=1e-5, rtol=1e-4)


def test_label_phase_resumes(synth_model, synth_data, tmp_path, monkeypatch):
    import dyvte.data as data_mod

    out = tmp_path / "g.safetensors"
    real = data_mod.Batcher.__call__
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # inside the second shard (shards of 8, forward batches of 4)
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(data_mod.Batcher, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        train_gates(_settings(synth_model, synth_data, out, epochs=1))
    monkeypatch.setattr(data_mod.Batcher, "__call__", real)
    logs = []
    train_gates(_settings(synth_model, synth_data, out, epochs=1, log=logs.append))
    assert any("1 of 3 shards" in m for m in logs), logs


def test_bad_settings(synth_model, synth_data, tmp_path):
    from dyvte.errors import InputError

    with pytest.raises(InputError):
        train_gates(_settings(synth_model, synth_data, tmp_path / "g", epochs=0))
    with pytest.raises(InputError, match="outside"):
        train_gates(_settings(synth_model, synth_data, tmp_path / "g", candidates=[9]))
    with pytest.raises(InputError, match="not found"):
        train_gates(_settings(synth_model, synth_data, tmp_path / "g", data=tmp_path / "none.json"))
