"""``CheckpointAveraging``: average the checkpoints a run wrote (top-k, last k, or a window), at fit end or at each
validation, streamed from disk; write the average as a Lightning checkpoint and load it into the module."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_merge.callbacks._checks import capture_of, captures_kind, selection
from lightning_merge.callbacks._distributed import on_rank_zero
from lightning_merge.callbacks._trained import load_weights
from lightning_merge.files.remote import basename, glob, is_url, join
from lightning_merge.tools.averaging import (
    WEIGHTINGS,
    average_checkpoints,
    distinct_checkpoints,
    read_info,
    select_checkpoints,
)

SELECTS = ("top_k", "last", "window", "all")


class CheckpointAveraging(Callback):
    """Average the checkpoints ModelCheckpoint wrote in this run.

    Example::

        trainer = Trainer(callbacks=[
            ModelCheckpoint(monitor="val_loss", save_top_k=5),
            CheckpointAveraging(select="top_k", k=5, weighting="mwa", p=1.0),
        ])
        trainer.fit(model, dm)      # at the end: averaged.ckpt written, the module holds the average
        trainer.test(model, dm)

    Args:
        select: ``"top_k"`` (the best k by the monitored metric among those on disk: with ``save_top_k=k`` exactly
            the ones ModelCheckpoint kept), ``"last"`` (the k most recent), ``"window"`` (saved within ``window``)
            or ``"all"``.
        k: how many for ``top_k`` / ``last`` (None: all on disk).
        window: ``(start, end)`` inclusive, in ``window_unit``.
        window_unit: ``"step"`` or ``"epoch"``.
        weighting: ``"uniform"``, ``"mwa"`` (metrics-weighted: wᵢ ∝ mᵢ⁻ᵖ for a metric to minimise, mᵢᵖ to
            maximise or for steps), ``"fisher"`` or ``"ota"`` (per-entry weights from the checkpoints' statistics
            sidecars written by ``CurvatureCapture``).
        mwa_by: MWA from the monitored ``"metric"`` or the ``"step"``.
        p: MWA's penalty exponent (0 = uniform).
        mode: ``"min"`` / ``"max"`` for the metric; None takes the ModelCheckpoint's.
        source: ``"state_dict"`` or ``"current_model_state"`` (raw weights in checkpoints written with Lightning's
            WeightAveraging / EMAWeightAveraging, whose ``state_dict`` holds their running average).
        out: the averaged checkpoint; default ``<checkpoint dir>/averaged.ckpt``.
        load_averaged: load the average into the module when done (every rank reads the file).
        every_validation: also average after each validation (the module keeps training its own weights; the
            file is refreshed); the final average is always computed at fit end.
        include / exclude: glob patterns of tensors to average; others come from the newest checkpoint.
        keep_training_state: keep the newest checkpoint's optimizer/loop state so the average resumes like any
            checkpoint; False writes weights only.
        update_bn_loader: ``"train"`` or ``"val"``: after loading the average, recompute BatchNorm running
            statistics over that Trainer loader (``torch.optim.swa_utils.update_bn``); None averages them like
            any tensor.
        rank: in a LoRA run, the averaged adapter's rank: None for the exact ΔW-space average (concatenated factors,
            rank k·r; uniform and metrics-weighted averaging), else a truncated SVD of each averaged ΔW (needed by
            ``weighting="fisher"`` / ``"ota"``, whose per-entry weights no sum of factors expresses).

    **A LoRA run** (the module trains a PEFT LoRA adapter) is averaged in ΔW space, never ``lora_A`` and ``lora_B``
    separately (that adds cross terms BᵢAⱼ no checkpoint learned): each checkpoint's adapter (read from the
    ``.ckpt`` with the module's ``LoraConfig``) is θ₀ + sᵢBᵢAᵢ, and the average is written as the adapter folder
    ``averaged.adapter`` (``out``) instead of ``averaged.ckpt``, then loaded into the ``PeftModel`` as the active
    adapter ``"averaged"``. ``CurvatureCapture``'s ``final.adapter`` keeps the last trained adapter (the one its
    statistics describe), and a log line says so.

    **With Lightning's weight averaging**: ``StochasticWeightAveraging`` copies its average into the module when
    training ends; loading the checkpoint average afterwards would replace it, so the pair is refused in ``setup``
    unless ``load_averaged=False`` (the module keeps SWA's weights; the file holds the checkpoint average).
    ``WeightAveraging`` / ``EMAWeightAveraging`` write their running average as each checkpoint's ``state_dict``:
    ``source="state_dict"`` averages those averages (``"current_model_state"``: the raw weights), and the checkpoint
    average is loaded last (in ``on_fit_end``, after their ``on_train_end``), so the module ends with it.
    """

    def __init__(
        self,
        select: Literal["top_k", "last", "window", "all"] = "top_k",
        k: int | None = None,
        window: tuple[int, int] | None = None,
        window_unit: Literal["step", "epoch"] = "step",
        weighting: Literal["uniform", "mwa", "fisher", "ota"] = "uniform",
        mwa_by: Literal["metric", "step"] = "metric",
        p: float = 1.0,
        mode: Literal["min", "max"] | None = None,
        source: Literal["state_dict", "current_model_state"] = "state_dict",
        out: str | None = None,
        load_averaged: bool = True,
        every_validation: bool = False,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        keep_training_state: bool = True,
        update_bn_loader: Literal["train", "val"] | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        if select not in SELECTS:
            raise ValueError(f"select must be one of {', '.join(SELECTS)}, got {select!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        if k is not None and k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if select == "window" and window is None:
            raise ValueError("select='window' needs window=(start, end)")
        if window_unit not in ("step", "epoch"):
            raise ValueError(f"window_unit must be 'step' or 'epoch', got {window_unit!r}")
        if mwa_by not in ("metric", "step"):
            raise ValueError(f"mwa_by must be 'metric' or 'step', got {mwa_by!r}")
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min', 'max' or None, got {mode!r}")
        if update_bn_loader not in (None, "train", "val"):
            raise ValueError(f"update_bn_loader must be 'train', 'val' or None, got {update_bn_loader!r}")
        self.select, self.k, self.window, self.window_unit = select, k, window, window_unit
        self.weighting, self.mwa_by, self.p, self.mode = weighting, mwa_by, p, mode
        self.source, self.out, self.load_averaged = source, out, load_averaged
        self.every_validation = every_validation
        self.include, self.exclude = selection("CheckpointAveraging", include, exclude)
        self.keep_training_state = keep_training_state
        self.update_bn_loader = update_bn_loader
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"CheckpointAveraging(rank=...) must be a positive integer or None, got {rank!r}")
        self.rank = rank
        self._adapter: Any = None  # the module's LoRA adapter (a ModuleAdapter), found in setup
        self.averaged: list[tuple[str, float | None]] = []  # what the last average used: (path, weight)
        self.averaged_path: str | None = None
        self._averaged_at: int | None = None
        self.merged_by: str | None = None  # a MergeOnFitEnd that merges this average and loads the merge

    @property
    def state_key(self) -> str:
        return self._generate_state_key(select=self.select, k=self.k, weighting=self.weighting, out=self.out)

    # -- hooks ---------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        who = "CheckpointAveraging"
        checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
        if not checkpoints:
            raise ValueError(f"{who} averages the checkpoints a ModelCheckpoint writes: add one to the Trainer")
        monitored = any(c.monitor for c in checkpoints)
        if (self.select == "top_k" or (self.weighting == "mwa" and self.mwa_by == "metric")) and not monitored:
            raise ValueError(
                f"{who}(select={self.select!r}, weighting={self.weighting!r}) ranks or weighs checkpoints by the "
                "monitored metric, and the ModelCheckpoint monitors none: give it monitor=..., or use select='last' "
                "and mwa_by='step'"
            )
        if self.weighting in ("fisher", "ota"):
            kind = "fisher" if self.weighting == "fisher" else "exp_avg_sq"
            capture = capture_of(trainer)
            if not captures_kind(capture, kind) or not capture.checkpoint_sidecars:
                raise ValueError(
                    f"{who}(weighting={self.weighting!r}) reads the {kind!r} statistic of each checkpoint from its "
                    "sidecar: add CurvatureCapture() (with checkpoint_sidecars=True, the default) to the Trainer"
                )
        self._check_weight_averaging(trainer)
        from lightning_merge.tools.peft_runs import module_adapter

        self._adapter = module_adapter(pl_module)
        if self._adapter is not None:
            self._setup_lora(pl_module)

    def _check_weight_averaging(self, trainer: pl.Trainer) -> None:
        """Lightning's StochasticWeightAveraging sets the module's final weights too: refused with loading."""
        from lightning.pytorch.callbacks import StochasticWeightAveraging

        swa = [c for c in trainer.callbacks if isinstance(c, StochasticWeightAveraging)]
        if swa and self.load_averaged:
            raise ValueError(
                "CheckpointAveraging(load_averaged=True) with StochasticWeightAveraging: both set the module's final "
                "weights (SWA copies its running average in when training ends, CheckpointAveraging would then load "
                "the checkpoint average over it). Pass load_averaged=False to keep SWA's weights in the module and "
                "still write the checkpoint average, or use one of the two"
            )

    def _setup_lora(self, pl_module: pl.LightningModule) -> None:
        """What an average in ΔW space needs, checked before the first training step."""
        who, adapter = "CheckpointAveraging", self._adapter
        if self.out is not None and str(self.out).endswith((".ckpt", ".safetensors")):
            raise ValueError(
                f"{who}: the module trains the LoRA adapter {adapter.name!r}, so the average is taken in ΔW space and "
                f"written as an adapter folder (no rank-r lora_A / lora_B of a .ckpt holds it); out={self.out!r} is a "
                "file: give a folder (default <checkpoint dir>/averaged.adapter)"
            )
        if self.weighting in ("fisher", "ota") and self.rank is None:
            raise ValueError(
                f"{who}(weighting={self.weighting!r}) in a LoRA run: per-entry curvature weights of ΔW are no sum of "
                "the checkpoints' factors, so no exact adapter holds the average; pass rank= for a truncated-SVD "
                "adapter, or use weighting='uniform' / 'mwa' (exact)"
            )
        outside = adapter.outside(pl_module)
        if outside:
            raise ValueError(
                f"{who}: the module trains {len(outside)} parameters outside its LoRA adapter {adapter.name!r} "
                f"({', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''}); the averaged adapter cannot carry "
                "them. Put them in the adapter (LoraConfig(modules_to_save=[...])) or freeze them"
            )
        if self.update_bn_loader is not None:
            raise ValueError(f"{who}(update_bn_loader=...) in a LoRA run: the adapter holds no BatchNorm statistics")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_validation and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._average(trainer, load=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._averaged_at != trainer.global_step:  # a MergeOnFitEnd may have asked for it already
            self._average(trainer, load=False)

    def average(self, trainer: pl.Trainer) -> dict[str, Any]:
        """The average of this fit (computed now if it has not been; every rank must call it), as a state dict:
        what :class:`~lightning_merge.callbacks.MergeOnFitEnd` merges as the trained model."""
        from lightning_merge.sources.expert import Expert

        if self._adapter is not None:
            raise ValueError("CheckpointAveraging.average(): this is a LoRA run, whose average is an adapter folder "
                             "(average_adapter())")
        averaged = Expert(self.averaged_file(trainer))
        return {n: averaged.tensor(n) for n in averaged.names()}

    def averaged_file(self, trainer: pl.Trainer) -> str:
        """The file of this fit's average (computed now if it has not been; every rank must call it)."""
        if self._averaged_at != trainer.global_step or self.averaged_path is None:
            self._average(trainer, load=False)
        assert self.averaged_path is not None
        return self.averaged_path

    def average_adapter(self, trainer: pl.Trainer) -> str:
        """The averaged adapter folder of this LoRA run (computed now if it has not been; every rank must call it):
        what :class:`~lightning_merge.callbacks.MergeOnFitEnd` merges as the trained model."""
        return self.averaged_file(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every callback's on_train_end (ModelCheckpoint's last save included); every rank reads the file.
        if self.merged_by is not None:
            rank_zero_info(f"CheckpointAveraging: the module keeps the merge of the average ({self.merged_by})")
            return
        if self._adapter is not None and self.load_averaged and self.averaged_path is not None:
            from lightning_merge.tools.peft_runs import load_adapter

            load_adapter(self._adapter, self.averaged_path, "averaged")
            rank_zero_info("CheckpointAveraging: the module's active adapter is now 'averaged'")
            return
        if self.load_averaged and self.averaged_path is not None:
            from lightning_merge.sources.expert import Expert

            load_weights(pl_module, Expert(self.averaged_path), "CheckpointAveraging")  # sharded: each its shard
            if self.update_bn_loader is not None:
                self._update_bn(trainer, pl_module)

    # -- work ----------------------------------------------------------------------------------------------------
    def _checkpoint_callback(self, trainer: pl.Trainer) -> ModelCheckpoint:
        ckpt = trainer.checkpoint_callback
        if ckpt is None or not getattr(ckpt, "dirpath", None):
            raise ValueError("CheckpointAveraging needs a ModelCheckpoint in the Trainer (it averages its checkpoints)")
        return ckpt

    def _average(self, trainer: pl.Trainer, load: bool) -> None:
        ckpt = self._checkpoint_callback(trainer)
        mode = self.mode or getattr(ckpt, "mode", "min")
        default = "averaged.adapter" if self._adapter is not None else "averaged.ckpt"
        out: Any = self.out or join(str(ckpt.dirpath), default)
        out = out if is_url(out) else Path(out)
        from lightning_merge.callbacks.capture import CurvatureCapture

        for callback in trainer.callbacks:  # sidecars still being written in the background must be complete
            if isinstance(callback, CurvatureCapture):
                callback.wait()

        def average() -> None:
            files = [p for p in glob(ckpt.dirpath, "*.ckpt") if _same(p) != _same(out)]
            distinct, skipped = distinct_checkpoints([read_info(f) for f in files])
            if skipped:
                why = "; ".join(f"{basename(p)} ({why})" for p, why in skipped)
                rank_zero_info(f"CheckpointAveraging: skipped {why}")
            if not distinct:
                raise ValueError(f"CheckpointAveraging: no checkpoint in '{ckpt.dirpath}' to average")
            infos = select_checkpoints(
                distinct,
                select=self.select,
                k=self.k,
                window=self.window,
                window_unit=self.window_unit,
                mode=mode,
            )
            paths = [str(i.path) for i in infos]
            if self._adapter is not None:
                weights = self._average_adapters(infos, paths, out, mode)
            else:
                _, weights = average_checkpoints(
                    paths,
                    out,
                    weighting=self.weighting,
                    mwa_by=self.mwa_by,
                    p=self.p,
                    mode=mode,
                    source=self.source,
                    include=self.include,
                    exclude=self.exclude,
                    keep_training_state=self.keep_training_state,
                    overwrite=True,
                )
            self.averaged = list(zip(paths, weights or [None] * len(paths)))
            used = ", ".join(f"{basename(p)} ({w:.3f})" if w is not None else basename(p) for p, w in self.averaged)
            rank_zero_info(f"CheckpointAveraging ({self.weighting}): {used} → {out}")
            if trainer.loggers:
                from lightning_merge.callbacks._logging import bars, log_to_loggers

                metrics: dict[str, float] = {"checkpoints": len(paths)}
                figures = {}
                if weights:
                    metrics.update({f"weight/{i}": w for i, w in enumerate(weights)})
                    figures["weights"] = bars({basename(p): w for p, w in self.averaged}, "averaging weights",
                                              "weight")
                log_to_loggers(trainer, "averaging", metrics, figures)

        on_rank_zero(trainer, average, "CheckpointAveraging: the average")
        self.averaged_path = str(out)
        self._averaged_at = trainer.global_step

    def _average_adapters(self, infos: list[Any], paths: list[str], out: Any, mode: str) -> list[float] | None:
        """The checkpoints' adapters averaged in ΔW space into the adapter folder ``out``: uniform and
        metrics-weighted averages as Linear (exact without ``rank``), the curvature weightings as Fisher / OTA."""
        from lightning_merge.engine.run import merge
        from lightning_merge.strategies.curvature import OTA, Fisher
        from lightning_merge.strategies.linear import Linear
        from lightning_merge.tools.averaging import checkpoint_weights
        from lightning_merge.tools.peft_runs import checkpoint_expert

        weights = checkpoint_weights(infos, self.weighting, mwa_by=self.mwa_by, p=self.p, mode=mode)
        experts = [checkpoint_expert(path, self._adapter, source=self.source) for path in paths]
        strategy: Any = (Linear(weights=weights) if weights is not None
                         else Fisher(normalize=False) if self.weighting == "fisher" else OTA())
        merge(experts, self._adapter.base, strategy, out=out, output="peft", rank=self.rank, include=self.include,
              exclude=self.exclude, overwrite=True)  # replaces only an earlier output of lightning-merge
        rank_zero_info(f"CheckpointAveraging: the averaged adapter (ΔW space) is {out}; CurvatureCapture's "
                       "final.adapter keeps the last trained adapter, which its statistics describe")
        return weights

    def _update_bn(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.optim.swa_utils import update_bn

        loader = trainer.train_dataloader if self.update_bn_loader == "train" else trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        if loader is None:
            raise ValueError(f"update_bn_loader={self.update_bn_loader!r}: the Trainer has no such dataloader")
        inputs = (b[0] if isinstance(b, (tuple, list)) else b for b in loader)
        update_bn(inputs, pl_module, device=pl_module.device)

    def state_dict(self) -> dict[str, Any]:
        return {"averaged": [[p, w] for p, w in self.averaged]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.averaged = [(p, w) for p, w in state_dict.get("averaged", [])]


def _same(path: Any) -> Any:
    return path if is_url(path) else Path(path).resolve()


__all__ = ["CheckpointAveraging"]
