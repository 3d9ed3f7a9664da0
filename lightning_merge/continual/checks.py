"""The checks of an expert against a continual state, before and while it is folded in: what the batch merge of the
base and the expert would refuse, another base, missing statistics, an expert inside the state, a duplicate (by its
checksum), and an expert much farther from the base than those already merged (an unrelated model)."""

from __future__ import annotations

import hashlib
import json
import logging
import statistics as _statistics
from pathlib import Path

import torch

from lightning_merge.continual.store import StateStore
from lightning_merge.errors import ContinualError
from lightning_merge.formats.sidecar import StatisticsError
from lightning_merge.sources.expert import Expert, as_expert

log = logging.getLogger("lightning_merge")
#: an expert whose task vector is this many times longer than the median expert already merged is refused as not
#: fine-tuned from the base (an unrelated model); a third of that is warned about.
MAX_RELATIVE_NORM = 10.0


def expert_checksum(expert: Expert) -> str:
    """Identity of an expert's weights: sha256 over names, shapes and sampled fingerprints of every tensor."""
    digest = hashlib.sha256()
    for name in sorted(expert.names()):
        digest.update(name.encode())
        digest.update(expert.fingerprint(name).encode())
    return digest.hexdigest()


def check_expert(state: StateStore, expert: Expert) -> None:
    """Refuse, before any work, what the batch merge of the base and this expert would refuse (tensors not in
    both, shapes, floating against integer, integer tensors that differ: ``build_jobs`` with ``on_missing``),
    and what a state cannot fold (another base, missing statistics, an expert inside the state).

    Args:
        state: the state the expert is to be folded into.
        expert: the expert.

    Raises:
        ContinualError: naming the expert, the tensor and what to do.
        StatisticsError: statistics the state's strategy needs are missing.
    """
    if expert.path is not None and state.url is None and _inside(expert.path, state.path):
        raise ContinualError(
            f"expert '{expert.name}' is inside the continual state '{state.path}', whose generations are replaced "
            "at every add; copy it out of the state first"
        )
    base = as_expert(state.config["base"], "base")
    tensors: dict[str, list[int]] = state.config["tensors"]
    floats = [n for n in base.names() if base.spec(n).is_floating]
    changed = [n for n in tensors if n not in floats] + [n for n in floats if n not in tensors]
    if changed:
        raise ContinualError(
            f"the base '{state.config['base']}' changed since the state was created: its floating-point tensors are "
            f"not those state.json records ({', '.join(changed[:3])}); restore the original base file"
        )
    lenient = state.on_missing == "base"
    missing = [n for n in base.names() if n not in expert]
    if missing and not lenient:
        raise ContinualError(
            f"expert '{expert.name}' lacks {len(missing)} tensor(s) of the base ({', '.join(missing[:3])}); "
            "it was not fine-tuned from this state's base (a state created with on_missing='base' counts a "
            "missing tensor as unchanged)"
        )
    extra = [n for n in expert.names() if n not in base]
    if extra and not lenient:
        raise ContinualError(
            f"tensor '{extra[0]}' is in '{expert.name}' but not in the base '{base.name}' ({len(extra)} such "
            "tensor(s)); a continual state merges the base's tensors, as merge(..., on_missing='error'): create "
            "the state with on_missing='base' (--on-missing base) to leave such tensors out"
        )
    lacking = [n for n in missing if n in tensors]
    if lacking and state.strategy.requires:
        raise ContinualError(
            f"expert '{expert.name}' lacks tensor '{lacking[0]}' of the base ({len(lacking)} such), and continual "
            f"{state.strategy.name} weighs every tensor by the expert's statistics, which it cannot have there"
        )
    if lacking and len(lacking) == len(tensors):
        raise ContinualError(f"expert '{expert.name}' has none of the base's floating-point tensors; it was not "
                             "fine-tuned from this state's base")
    for n in base.names():
        if n not in expert:
            continue
        want, got = base.spec(n), expert.spec(n)
        if list(got.shape) != list(want.shape):
            raise ContinualError(f"expert '{expert.name}': tensor '{n}' has shape {list(got.shape)}, the base "
                                 f"{list(want.shape)}")
        if got.is_floating != want.is_floating:
            raise ContinualError(
                f"expert '{expert.name}': tensor '{n}' is {'' if got.is_floating else 'not '}floating point and "
                f"the base's is {'' if want.is_floating else 'not'}; the expert was not fine-tuned from this base"
            )
        if not want.is_floating and not n.endswith("num_batches_tracked") \
                and not torch.equal(expert.tensor(n), base.tensor(n)):
            raise ContinualError(
                f"non-floating tensor '{n}' differs between the base '{base.name}' and '{expert.name}'; such "
                "tensors (indices, position ids) are copied, not merged, so they must be equal, as in "
                "merge(...): fix the expert"
            )
    fingerprint = _expert_base_fingerprint(expert)
    if fingerprint:
        base_fp = state.config["base_fingerprint"]
        differ = [n for n in base_fp if n in fingerprint and fingerprint[n] != base_fp[n]]
        if differ:
            raise ContinualError(
                f"expert '{expert.name}' was fine-tuned from another base: its capture's base fingerprint differs "
                f"on {len(differ)} tensor(s) ({', '.join(differ[:3])})"
            )
    for kind in state.strategy.requires:
        if not expert.has_statistic(kind):
            raise StatisticsError(
                f"expert '{expert.name}' has no {kind!r} statistics, which continual {state.strategy.name} needs; "
                "capture them with CurvatureCapture"
            )


def check_distance(expert: Expert, norm: float, norms: list[float], force: bool) -> None:
    """An expert ten times farther from the base than those already merged is refused (an unrelated model, or
    one fine-tuned from another base without a capture fingerprint to say so); three times is warned about.

    Args:
        expert: the expert being folded in (for messages).
        norm: the length of its task vector.
        norms: those of the experts already merged.
        force: fold it in whatever its distance.

    Raises:
        ContinualError: it is more than :data:`MAX_RELATIVE_NORM` times farther than their median.
    """
    if force or not norms:
        return
    typical = _statistics.median(norms)
    if typical <= 0:
        return
    ratio = norm / typical
    if ratio > MAX_RELATIVE_NORM:
        raise ContinualError(
            f"expert '{expert.name}' moved {ratio:.1f}× farther from the base than the experts already merged "
            f"(‖τ‖ = {norm:.4g}, median {typical:.4g}): it does not look fine-tuned from this state's base. Pass "
            "force=True (--force) to fold it in anyway"
        )
    if ratio > MAX_RELATIVE_NORM / 3:
        log.warning(
            "expert '%s' moved %.1f× farther from the base than the experts already merged (‖τ‖ = %.4g, median "
            "%.4g): check that it was fine-tuned from this base", expert.name, ratio, norm, typical)


def _expert_base_fingerprint(expert: Expert) -> dict[str, str]:
    stats = expert.statistics
    if stats is None:
        return {}
    raw = stats.metadata.get("base_fingerprint")
    if not raw:
        return {}
    try:
        fingerprint = json.loads(raw)
    except json.JSONDecodeError:
        raise ContinualError(f"{stats.origin}: metadata base_fingerprint is not valid JSON") from None
    prefix = expert.prefix or ""
    return {k[len(prefix):]: v for k, v in fingerprint.items() if k.startswith(prefix)}


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False
