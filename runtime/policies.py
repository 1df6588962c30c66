"""Exit policies (contract): ``never``, ``layer:K``, ``gate``, ``vtw``."""

from __future__ import annotations

from dataclasses import dataclass

from dyvte.errors import PolicyError

POLICY_HELP = "never | layer:K (K = 0, a candidate, or L) | gate | vtw"


@dataclass(frozen=True)
class Policy:
    """``layer`` is the fixed exit layer (never: L); ``gated`` asks the gates at each candidate."""

    name: str
    layer: int | None = None
    gated: bool = False

    def fixed_exit(self, boundary: int) -> bool:
        return self.layer == boundary


def parse_policy(text: str, manifest) -> Policy:
    """Resolve a policy string against an engine folder (candidates, gates, calibration)."""
    L, cands = manifest.num_layers, manifest.candidates
    text = (text or "").strip()
    if text == "never":
        return Policy("never", L)
    if text == "gate":
        if manifest.gate is None:
            raise PolicyError(
                f"policy 'gate' needs gates, and {manifest.root} was exported without them; re-export with "
                "--gates FILE (train one with `dyvte train-gates`) or use --policy never|layer:K"
            )
        return Policy("gate", None, gated=True)
    if text == "vtw":
        cal = manifest.calibration.get("vtw")
        if not cal:
            raise PolicyError(
                f"policy 'vtw' needs a calibrated exit layer; run `dyvte calibrate-vtw --engine-dir {manifest.root}` first"
            )
        return Policy("vtw", int(cal["exit_layer"]))
    if text.startswith("layer:"):
        try:
            k = int(text.split(":", 1)[1])
        except ValueError:
            raise PolicyError(f"policy '{text}': K must be an integer ({POLICY_HELP})") from None
        if k not in (0, L, *cands):
            raise PolicyError(
                f"policy '{text}': this engine folder can exit only at 0, {', '.join(map(str, cands))} or {L} "
                "(the candidate layers it was exported with); re-export with --candidates to add others"
            )
        return Policy(text, k)
    raise PolicyError(f"unknown policy '{text}'; use {POLICY_HELP}")
