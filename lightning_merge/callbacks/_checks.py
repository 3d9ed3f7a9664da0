"""What the merge callbacks can check in ``setup``, before the first training step, instead of after the fit: the
experts match the module (names and shapes), the statistics the strategy needs exist or will be captured."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lightning_merge.engine.options import patterns
from lightning_merge.engine.options import selects as selected
from lightning_merge.formats.sidecar import RAW_SECOND_MOMENTS


def capture_of(trainer: Any) -> Any:
    """The trainer's ``CurvatureCapture``, or None."""
    from lightning_merge.callbacks.capture import CurvatureCapture

    return next((c for c in trainer.callbacks if isinstance(c, CurvatureCapture)), None)


def selection(who: str, include: Sequence[str] | str | None,
              exclude: Sequence[str] | str | None) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """A callback's ``include=`` / ``exclude=`` as the engine reads them (:func:`selected`, one rule everywhere).
    ``include=[]`` selects no tensor, which a merge refuses: refused here, when the callback is made, not after the
    fit."""
    include, exclude = patterns(include, "include"), patterns(exclude, "exclude")
    if include == ():
        raise ValueError(f"{who}: include=[] selects no tensor, so nothing would be merged (the rule of merge()); "
                         "pass include=None to merge every floating tensor")
    return include, exclude


def check_experts_match(who: str, experts: Sequence[Any], module_state: Mapping[str, Tensor],
                        include: Sequence[str] | None = None, exclude: Sequence[str] | None = None) -> None:
    """Every floating tensor of the module that will be merged is in each expert, with the module's shape."""
    for expert in experts:
        for name, value in module_state.items():
            if not value.is_floating_point() or not selected(name, include, exclude):
                continue
            if name not in expert:
                raise ValueError(
                    f"{who}: expert '{expert.name}' has no tensor '{name}' of the module; its names are the "
                    "module's state_dict names (a .ckpt or final.safetensors of the same LightningModule), or pass "
                    "include=/exclude= to merge only the tensors they share"
                )
            shape = tuple(expert.spec(name).shape)
            if shape != tuple(value.shape):
                raise ValueError(
                    f"{who}: tensor '{name}' has shape {list(shape)} in expert '{expert.name}' but {list(value.shape)} "
                    "in the module: they do not share an architecture"
                )


def captures_kind(capture: Any, kind: str) -> bool:
    """Whether a ``CurvatureCapture`` configured like this records the statistic ``kind``."""
    if capture is None:
        return False
    if kind in ("exp_avg_sq", RAW_SECOND_MOMENTS):
        return bool(capture.second_moments)
    if kind == "fisher":
        return bool(capture.fisher or capture.fisher_after_fit)
    if kind == "fisher.batch":
        return bool(capture.fisher)
    if kind.startswith("fisher."):
        return capture.fisher_after_fit == kind.split(".", 1)[1]
    if kind == "gram":
        return capture.gram is not None
    return False


def check_statistics(who: str, strategy: Any, experts: Sequence[Any], trainer: Any, policy: str,
                     trained: bool = True) -> None:
    """The statistics ``strategy`` needs: each expert has them, and the run will capture them for the model it
    trains (``trained``), unless the policy is ``"uniform"``."""
    if policy == "uniform":
        return
    capture = capture_of(trainer)
    for kind in strategy.requires:
        for expert in experts:
            if not expert.has_statistic(kind):
                raise ValueError(
                    f"{who}: expert '{expert.name}' has no {kind!r} statistics, which {strategy.name} needs; capture "
                    "them with CurvatureCapture, or pass on_missing_statistic='uniform'"
                )
        if trained and not captures_kind(capture, kind):
            what = "no CurvatureCapture" if capture is None else "a CurvatureCapture that does not record it"
            raise ValueError(
                f"{who}: {strategy.name} needs the {kind!r} statistic of the model this fit trains, and the Trainer "
                f"has {what}; add CurvatureCapture() (with fisher_after_fit= for a post-fit estimator, gram= for "
                "Gram matrices (RegMean, CAT Merging)) before the fit"
            )


__all__ = ["capture_of", "captures_kind", "check_experts_match", "check_statistics", "selected", "selection"]


def after_weight_averaging(trainer: Any, callback: Any) -> bool:
    """Move ``callback`` after Lightning's own weight-averaging callbacks (``StochasticWeightAveraging``,
    ``WeightAveraging`` and its ``EMAWeightAveraging``) in ``trainer.callbacks``, so that its ``on_train_end`` sees
    the averaged weights they copy into the module in theirs, whatever order the user listed them in. Returns
    whether there is such a callback."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    try:
        from lightning.pytorch.callbacks import WeightAveraging
        kinds: tuple[type, ...] = (StochasticWeightAveraging, WeightAveraging)
    except ImportError:  # older Lightning
        kinds = (StochasticWeightAveraging,)
    callbacks = list(trainer.callbacks)
    averaging = [i for i, c in enumerate(callbacks) if isinstance(c, kinds)]
    if not averaging or callback not in callbacks:
        return bool(averaging)
    if callbacks.index(callback) < averaging[-1]:
        callbacks.remove(callback)
        callbacks.insert(averaging[-1], callback)  # the last averaging callback moved one place up: right after it
        # a new list: the hook being called now iterates the old one, which must not change under it
        trainer.callbacks = callbacks
    return True
