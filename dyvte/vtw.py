"""VTW calibration (training-free static exit): the first candidate layer d whose mean
KL(P_withdrawn || P_full) of the first generated token's distribution, over n samples, is <= eta.
The result is stored in the engine folder's manifest and used by policy ``vtw``."""

from __future__ import annotations

from pathlib import Path

DEFAULT_ETA = 0.003  # VTW's value for LLaVA-1.5-7B
DEFAULT_SAMPLES = 20


def _kl(p_logits, q_logits) -> float:
    """KL(P || Q) of two logit vectors."""
    import torch

    lp = torch.log_softmax(torch.as_tensor(p_logits).double(), -1)
    lq = torch.log_softmax(torch.as_tensor(q_logits).double(), -1)
    return float((lp.exp() * (lp - lq)).sum())


def calibrate_vtw(engine_dir: str | Path, data=None, image_root=None, samples: int = DEFAULT_SAMPLES,
                  eta: float = DEFAULT_ETA, backend: str = "auto", save: bool = True, progress: bool = True) -> dict:
    """Measure mean KL per candidate and pick the VTW exit layer (L when none qualifies)."""
    from tqdm.auto import tqdm

    from dyvte.data import records_to_qa
    from dyvte.engines.files import write_json
    from dyvte.errors import InputError
    from dyvte.runtime import Pipeline
    from dyvte.settings import MANIFEST_NAME
    from dyvte.synth import demo_split, load_records

    if samples < 1 or eta < 0:
        raise InputError("--samples must be >= 1 and --eta >= 0")
    if data is None:
        data, image_root = demo_split("calib", samples)
    qa = records_to_qa(load_records(data), image_root, samples)
    with Pipeline.load(engine_dir, backend=backend) as pipe:
        L, cands = pipe.num_layers, pipe.candidates
        kl = {d: 0.0 for d in cands}
        for s in tqdm(qa, desc="vtw", unit="sample", disable=not progress):
            req = pipe.encode(s.image, s.question, max_new_tokens=1)  # once per sample, not once per layer

            def first_logits(policy):
                return pipe.run([req], policy=policy, return_logits=True)[0].logits[0]

            full = first_logits("never")
            for d in cands:
                kl[d] += _kl(first_logits(f"layer:{d}"), full) / len(qa)
        exit_layer = next((d for d in cands if kl[d] <= eta), L)
        result = {"exit_layer": exit_layer, "eta": eta, "samples": len(qa), "mean_kl": {str(d): v for d, v in kl.items()},
                  "data": str(data)}
        if save:
            m = pipe.manifest
            m.data.setdefault("calibration", {})["vtw"] = result
            write_json(m.root / MANIFEST_NAME, m.data)
    return result
