"""WIDEN (Yu et al., 2024, "Extend Model Merging from Fine-Tuned to Pre-Trained Large Language Models via Weight
Disentanglement"), as the authors' ``widen_merging`` (yule-BUAA/MergeLLM) computes it.

Each 2-D weight W (out × in) is split into a magnitude per column, m = ‖W[:, j]‖₂, and a direction D = W / m, for the
base and every expert. How far expert i moved a column from the base is measured twice,

    ΔMᵢ[j] = |mᵢ[j] − m₀[j]|,    ΔDᵢ[j] = 1 − cos(Dᵢ[:, j], D₀[:, j]),

and each is turned into a rank within the expert: the column of the k-th smallest change (stable order) scores
k / in, so each expert's scores run over 0, 1/in, …, (in − 1)/in whatever the size of its changes (a pre-trained
expert that moved far and a fine-tuned one that moved little compete on equal terms). Per column, the scores of the
N experts become weights by a softmax over the experts, except where an expert's score exceeds
``above_average_value_ratio`` × its mean score over the columns: there the weight is ``score_calibration_value``
(the reference's calibration: an expert's most changed columns keep its change whole). With Sᴹ and Sᴰ those
weights for magnitude and direction,

    θ = θ₀ + scale · Σᵢ ½ (Sᴹᵢ[j] + Sᴰᵢ[j]) τᵢ[:, j].

Token embeddings, stored (vocabulary × dim), are transposed first, so that a column is a token (``embeddings``
names them; the reference transposes ``model.embed_tokens.weight``). Every other tensor (biases, norms; here also
≥ 3-D tensors, which the reference refuses) is scored entry by entry on |τᵢ| itself, without ranks: the softmax over
experts of |τᵢ|, calibrated where |τᵢ| exceeds ratio × its mean over the tensor.

A column whose norm is 0 in the base or in the expert has no direction: its ΔD ranks above every other column's
(the reference divides by the zero norm, and its sort puts the NaN last: the same ranks).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_merge.errors import NoContinualForm
from lightning_merge.strategies.base import ContinualForm, Prepared, Strategy
from lightning_merge.strategies.checks import check_number, check_pattern
from lightning_merge.strategies.registry import Reference

#: the reference's token embeddings (``model.embed_tokens.weight``), under any prefix
EMBEDDINGS = r"(?:^|\.)embed_tokens\.weight$"


def column_changes(weight: Tensor, base: Tensor) -> tuple[Tensor, Tensor]:
    """(ΔM, ΔD) of one expert's 2-D weight against the base's, per column (float32, ``(in,)`` each): the change of
    the column norms and one minus the cosine of the column directions; ΔD is +inf where a column's norm is 0 in
    either."""
    m0 = torch.linalg.vector_norm(base, dim=0)
    m = torch.linalg.vector_norm(weight, dim=0)
    cos = torch.cosine_similarity(weight / m, base / m0, dim=0)
    direction = (1.0 - cos).masked_fill_((m == 0) | (m0 == 0), float("inf"))
    return (m - m0).abs_(), direction


def within_expert_ranks(changes: Tensor) -> Tensor:
    """Each row's entries replaced by their ascending rank over the row divided by its length (stable: equal changes
    rank in column order); ``changes`` is (N, in)."""
    n = changes.shape[1]
    order = torch.argsort(changes, dim=1, stable=True)
    steps = (torch.arange(n, device=changes.device) / n).expand_as(changes)
    return torch.empty_like(steps).scatter_(1, order, steps)


def importance(scores: Tensor, ratio: float, calibration: float) -> Tensor:
    """The weights of N experts from their scores ``(N, ...)``: the softmax over experts, replaced by
    ``calibration`` where an expert's score exceeds ``ratio`` × the mean of its own scores."""
    weights = torch.softmax(scores, dim=0)
    mean = scores.reshape(scores.shape[0], -1).mean(dim=1)
    above = scores > (mean * ratio).view(-1, *[1] * (scores.dim() - 1))
    return weights.masked_fill_(above, calibration)


def widen_weights(weights: Sequence[Tensor], base: Tensor, ratio: float, calibration: float) -> Tensor:
    """WIDEN's weight of each expert for each column of a 2-D tensor, ½(Sᴹ + Sᴰ), shape (N, in)."""
    changes = [column_changes(w, base) for w in weights]
    magnitude = within_expert_ranks(torch.stack([c[0] for c in changes]))
    direction = within_expert_ranks(torch.stack([c[1] for c in changes]))
    return (importance(magnitude, ratio, calibration) + importance(direction, ratio, calibration)).mul_(0.5)


@dataclasses.dataclass(frozen=True)
class WIDEN(Strategy):
    """WIDEN: weights per column from how far each expert moved the column's magnitude and direction, ranked within
    the expert (see the module docstring).

    Args:
        above_average_value_ratio: an expert's score above this × its mean score (over the columns of a 2-D tensor,
            over the entries of any other) takes ``score_calibration_value`` instead of its softmax weight (the
            reference's default 1.0). Ranks never exceed twice their mean, so for 2-D tensors a ratio above 2 (say
            3) turns the calibration off.
        score_calibration_value: the weight of those changes (the reference's default 1.0: the expert's change kept
            whole; each of the magnitude and direction halves contributes ½ of it).
        scale: λ, the step along the merged task vector (an extension: the reference adds it as it is, 1).
        embeddings: a regular expression of the 2-D tensors stored (tokens × dim), transposed before the rule so
            that a token is a column (the default matches the reference's ``model.embed_tokens.weight``, under any
            prefix); None transposes none.
    """

    name = "widen"
    reference = Reference("https://arxiv.org/abs/2408.03092", ("https://github.com/yule-BUAA/MergeLLM",))
    scalable = True

    above_average_value_ratio: float = 1.0
    score_calibration_value: float = 1.0
    scale: float = 1.0
    embeddings: str | None = EMBEDDINGS

    def __post_init__(self) -> None:
        owner = type(self)
        check_number(owner, "above_average_value_ratio", self.above_average_value_ratio)
        check_number(owner, "score_calibration_value", self.score_calibration_value)
        check_number(owner, "scale", self.scale)
        check_pattern(owner, "embeddings", self.embeddings)

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        ratio, calibration = self.above_average_value_ratio, self.score_calibration_value
        if base.dim() != 2:
            taus = torch.stack([t - base for t in tensors])
            weights = importance(taus.abs(), ratio, calibration)
            return (taus.mul_(weights)).sum(dim=0).mul_(self.scale).add_(base)
        transpose = self.embeddings is not None and re.search(self.embeddings, name) is not None
        if transpose:
            base, tensors = base.T, [t.T for t in tensors]
        weights = widen_weights(tensors, base, ratio, calibration)
        merged = torch.zeros_like(base)
        for tensor, weight in zip(tensors, weights):
            merged += (tensor - base).mul_(weight)
        merged = merged.mul_(self.scale).add_(base)
        return merged.T.contiguous() if transpose else merged

    def working_set(self, num_experts: int) -> float:
        """The larger of :meth:`tensor_working_set`'s two cases (a 2-D tensor's, any other's)."""
        return max(self.tensor_working_set(num_experts, "", (1, 1)), self.tensor_working_set(num_experts, "", (1,)))

    def tensor_working_set(self, num_experts: int, name: str, shape: tuple[int, ...]) -> float:
        """A 2-D tensor: the inputs (n + 1), the two directions and the cosine's normalised copies of one expert at
        a time, one task vector, the merged tensor and a transposed embedding's copy: n + 7. Any other (1-D, ≥ 3-D,
        entry by entry): the inputs, the stack of n task vectors, their magnitudes, the softmax's n weights and the
        calibration's boolean mask (a quarter copy each), the sum: 4.5n + 2. Measured 2026-12-07 (VmHWM, n = 2–4):
        n + 6 for 1024², 2048 × 512 and 512 × 2048; 4.25n + 1 for 1-D, 3-D and 4-D tensors (it was declared n + 9)."""
        if len(shape) == 2:
            return num_experts + 7
        return 4.5 * num_experts + 2

    def continual_form(self) -> ContinualForm:  # noqa: D102
        raise NoContinualForm(
            "WIDEN has no continual form: its scores compare each expert's column norms and directions with the "
            "base's, which a continual fold (given the task vector only) does not see, and its softmax is over every "
            "expert; use task_arithmetic or ram for continual merges"
        )


__all__ = ["EMBEDDINGS", "WIDEN", "column_changes", "importance", "within_expert_ranks", "widen_weights"]
