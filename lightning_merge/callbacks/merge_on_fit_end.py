"""``MergeOnFitEnd``: when a fit ends, merge the model just trained with other experts, write the result, and
(optionally) load it into the LightningModule so that ``trainer.test`` / ``trainer.validate`` see the merge."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from lightning_merge.callbacks._checks import (
    after_weight_averaging,
    check_experts_match,
    check_statistics,
    selection,
)
from lightning_merge.callbacks._distributed import on_rank_zero
from lightning_merge.callbacks._trained import holds_shards, load_weights, module_state, write_weights
from lightning_merge.engine.options import ON_MISSING_STATISTIC
from lightning_merge.files.outputs import check_not_an_input, remove_output
from lightning_merge.files.remote import exists as remote_exists
from lightning_merge.files.remote import is_url, join, redact
from lightning_merge.strategies.base import Strategy

SNAPSHOTS = ("disk", "memory")


class MergeOnFitEnd(Callback):
    """Merge the model just trained with other experts when ``trainer.fit`` ends.

    Example::

        capture = CurvatureCapture()
        merger = MergeOnFitEnd(
            experts=["runs/code/final.safetensors", "runs/math/final.safetensors"],
            strategy=Fisher(scale=1.0),
            include=["backbone.*"],           # heads stay the module's own
            out="runs/merged.safetensors",
        )
        trainer = Trainer(callbacks=[capture, merger])
        trainer.fit(model, dm)                # at the end: model holds the merged weights
        trainer.test(model, dm)               # evaluates the merged model

    The just-trained model is the first expert, read from the module in memory with the statistics of a
    ``CurvatureCapture`` in the same Trainer (``capture.finalize()``, whatever the callbacks' order); the other
    experts are read lazily from disk with their sidecars. Tensor names are the LightningModule's ``state_dict``
    names (a ``.ckpt`` of another run of the same module has the same ones).

    Under DDP rank 0 merges and writes while the other ranks wait; every rank then loads the written file, so all
    end with the same weights; a failure on rank 0 is raised on every rank.

    On a sharded module (FSDP2, ``fully_shard`` in ``configure_model`` under ``ModelParallelStrategy``) the trained
    weights and statistics are gathered tensor by tensor into ``<dirpath>/merge_trained.safetensors`` (removed after
    the merge), rank 0 merges from files, and every rank loads its shard of the result: no rank holds the whole
    model (see docs/capture.md, "The fit-end callbacks on FSDP2").

    What can be checked is checked in ``setup``, before the first training step: the experts' tensor names and shapes
    against the module, their statistics, and that a ``CurvatureCapture`` in the Trainer records the statistics the
    strategy needs for the model being trained.

    With a :class:`~lightning_merge.callbacks.CheckpointAveraging` in the same Trainer, its average is the trained
    model that is merged (computed first, whatever the callbacks' order), and the module ends with the merge.

    **A module that trains a PEFT LoRA adapter** is merged in ΔW space, as the command line merges adapters (never
    ``lora_A`` and ``lora_B`` separately): the trained expert is the module's adapter (with the statistics of a
    ``CurvatureCapture``, renamed like the adapter's weights), the other experts are adapter folders (``X.adapter/``
    written by ``CurvatureCapture``, PEFT ``save_pretrained`` folders) or ``.ckpt`` files of LoRA runs of the same
    module, all over the module's own base; the result is an adapter folder (``out``, default
    ``<dirpath>/merged.adapter``: exact for a strategy linear in the experts, else a truncated SVD at ``rank``),
    loaded into the ``PeftModel`` as the active adapter ``adapter_name``. What cannot be merged so (a full-model
    expert, a non-linear strategy without ``rank``, trained parameters outside the adapter, a ``.safetensors`` /
    ``.ckpt`` output) is refused in ``setup`` with the reason.

    Args:
        experts: paths of the other experts (``.ckpt``, ``.safetensors``, Hugging Face folders; for a LoRA module
            adapter folders or ``.ckpt`` files of LoRA runs), in order.
        strategy: a :class:`~lightning_merge.Strategy` or its ``to_dict()`` form (``{"name": "ties", ...}``).
        base: path of the base model; None snapshots the module's weights when a fresh fit starts (restored
            from the checkpoint on resume). Needed by strategies that use task vectors.
        snapshot: where the fit-start snapshot lives: ``"disk"`` (a safetensors file in ``dirpath``; keeps memory
            bounded for large models) or ``"memory"`` (refused on a sharded module).
        out: the merged model's file: ``.safetensors`` or ``.ckpt`` (a Lightning checkpoint with the merged
            ``state_dict``, loadable with ``trainer.fit(ckpt_path=...)`` weights-only); default
            ``<dirpath>/merged.safetensors``. For a LoRA module: the merged adapter's folder, default
            ``<dirpath>/merged.adapter``.
        dirpath: folder of the snapshot and default output; default the Trainer's ``default_root_dir``.
        include: glob patterns of the tensors to merge (default all floating tensors); the others keep the
            just-trained module's values (its own head, for example).
        exclude: glob patterns of tensors not to merge.
        load_merged: load the merged weights into the module at the end.
        on_missing_statistic: ``"error"`` or ``"uniform"`` (see :func:`lightning_merge.merge`).
        log_report: with loggers in the Trainer, log the merge's key numbers (mean cosine of the task vectors, sign
            conflicts, each ‖τᵢ‖, ‖τ*‖) and figures (:func:`lightning_merge.report`) under ``merge/``; it reads the
            experts once more.
        rank: for a LoRA module, the merged adapter's rank: None for the exact concatenation of the adapters'
            factors (rank Σrᵢ; strategies linear in the experts only), else a truncated SVD of each merged ΔW.
        adapter_name: for a LoRA module, the name the merged adapter is loaded under (and made active).
    """

    def __init__(
        self,
        experts: Sequence[str],
        strategy: Strategy | Mapping[str, Any],
        base: str | None = None,
        snapshot: Literal["disk", "memory"] = "disk",
        out: str | None = None,
        dirpath: str | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        load_merged: bool = True,
        on_missing_statistic: Literal["error", "uniform"] = "error",
        log_report: bool = True,
        rank: int | None = None,
        adapter_name: str = "merged",
    ) -> None:
        super().__init__()
        if isinstance(experts, (str, os.PathLike)):
            raise ValueError("MergeOnFitEnd(experts=...) takes a list of paths, got one string")
        self.experts = [str(e) for e in experts]
        self.strategy = strategy if isinstance(strategy, Strategy) else Strategy.from_dict(strategy)
        if snapshot not in SNAPSHOTS:
            raise ValueError(f"snapshot must be one of {', '.join(SNAPSHOTS)}, got {snapshot!r}")
        if out is not None and PurePosixPath(str(out)).suffix not in ("", ".adapter", ".safetensors", ".ckpt"):
            raise ValueError(f"out must end in .safetensors or .ckpt (for a module that trains a LoRA adapter: a "
                             f"folder, such as merged.adapter), got {out!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"MergeOnFitEnd(rank=...) must be a positive integer or None, got {rank!r}")
        if on_missing_statistic not in ON_MISSING_STATISTIC:
            raise ValueError(f"on_missing_statistic must be 'error' or 'uniform', got {on_missing_statistic!r}")
        for path in self.experts:
            if not remote_exists(path):
                raise FileNotFoundError(f"MergeOnFitEnd: expert '{path}' does not exist")
        if base is not None and not remote_exists(base):
            raise FileNotFoundError(f"MergeOnFitEnd: base '{base}' does not exist")
        self.base = base
        self.snapshot = snapshot
        self.out = out
        self.dirpath = dirpath
        self.include, self.exclude = selection("MergeOnFitEnd", include, exclude)
        self.load_merged = load_merged
        self.on_missing_statistic = on_missing_statistic
        self.log_report = log_report
        self.rank = rank
        self.adapter_name = adapter_name
        self._adapter: Any = None  # the module's LoRA adapter (a ModuleAdapter), found in setup
        self._snapshot_path: str | None = None
        self._snapshot_state: dict[str, Tensor] | None = None
        self.merged_path: str | None = None  # set when a fit ends

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(experts=self.experts, out=self.out, strategy=self.strategy.name)

    def state_dict(self) -> dict[str, Any]:
        return {"snapshot_path": self._snapshot_path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._snapshot_path = state_dict.get("snapshot_path")

    # -- hooks ---------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning_merge.sources.expert import Expert

        who = "MergeOnFitEnd"
        after_weight_averaging(trainer, self)  # SWA / EMA put their average in the module first: that is merged
        from lightning_merge.tools.peft_runs import module_adapter

        self._adapter = module_adapter(pl_module)
        if self._adapter is not None:
            self._setup_lora(trainer, pl_module)
            return
        if self.out is not None and not str(self.out).endswith((".safetensors", ".ckpt")):
            raise ValueError(f"{who}: out must end in .safetensors or .ckpt, got {self.out!r} (an adapter folder is "
                             "the output of a module that trains a PEFT LoRA adapter, and this one holds none)")
        experts = [Expert(path) for path in self.experts]
        state = pl_module.state_dict()
        check_experts_match(who, experts, state, self.include, self.exclude)
        if self.base is not None:
            check_experts_match(who, [Expert(self.base)], state, self.include, self.exclude)
        check_statistics(who, self.strategy, experts, trainer, self.on_missing_statistic)
        from lightning_merge.callbacks.averaging import CheckpointAveraging

        for callback in trainer.callbacks:  # the average is what this merges: the module must end with the merge
            if isinstance(callback, CheckpointAveraging) and self.load_merged:
                callback.merged_by = "MergeOnFitEnd"

    def _setup_lora(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """What a merge in ΔW space needs, checked before the first training step."""
        from lightning_merge.callbacks.averaging import CheckpointAveraging
        from lightning_merge.engine.outputs import check_peft_request
        from lightning_merge.tools.peft_runs import adapter_expert

        who, adapter = "MergeOnFitEnd", self._adapter
        if self.out is not None and str(self.out).endswith((".safetensors", ".ckpt")):
            raise ValueError(
                f"{who}: the module trains the LoRA adapter {adapter.name!r}, so the merge is an adapter (ΔW space) "
                f"written as an adapter folder and loaded into the PeftModel; out={self.out!r} is a file: give a "
                "folder (default <dirpath>/merged.adapter)"
            )
        if self.base is not None:
            raise ValueError(f"{who}(base=...): the module trains a LoRA adapter, whose base is the PeftModel's own "
                             "base model (read from the module); leave base=None")
        outside = adapter.outside(pl_module)
        if outside:
            raise ValueError(
                f"{who}: the module trains {len(outside)} parameters outside its LoRA adapter {adapter.name!r} "
                f"({', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''}); an adapter merge cannot carry them. "
                "Put them in the adapter (LoraConfig(modules_to_save=[...])) or freeze them"
            )
        if self.adapter_name == adapter.name:
            raise ValueError(f"{who}(adapter_name={self.adapter_name!r}) is the adapter being trained; the merge "
                             "is loaded beside it under another name")
        experts = [adapter_expert(path, adapter, who) for path in self.experts]
        check_peft_request(self.strategy, self.out or "merged.adapter", self.rank, 1 + len(experts))
        check_statistics(who, self.strategy, experts, trainer, self.on_missing_statistic)
        for callback in trainer.callbacks:
            if isinstance(callback, CheckpointAveraging):
                if self.strategy.requires and self.on_missing_statistic != "uniform":
                    raise ValueError(
                        f"{who}({self.strategy.name}) with CheckpointAveraging in a LoRA run: the trained expert would "
                        "be the averaged adapter, whose factors no statistics describe (the captured ones are the "
                        "last adapter's); use a strategy without statistics, or drop one of the two callbacks"
                    )
                if self.load_merged:
                    callback.merged_by = "MergeOnFitEnd"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.merged_path = None
        if self.base is not None or self._adapter is not None:  # a LoRA module's base is its PeftModel's own
            return
        if trainer.ckpt_path is not None:  # a resumed fit: the snapshot of the first fit start is the base
            if self.snapshot == "disk" and self._snapshot_path and remote_exists(self._snapshot_path):
                return
            raise ValueError(
                "MergeOnFitEnd: resuming a fit whose base snapshot is gone (or was kept in memory); pass base= the "
                "weights the first fit started from"
            )
        state = module_state(trainer, pl_module)  # every rank (a sharded module: its DTensor shards)
        if self.snapshot == "memory":
            if holds_shards(state):
                raise ValueError(
                    "MergeOnFitEnd(snapshot='memory') would hold the whole model on every rank, and this module is "
                    "sharded (FSDP2): use snapshot='disk' (written gathered tensor by tensor) or pass base="
                )
            self._snapshot_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
            return
        path = join(self._dir(trainer), "merge_base_snapshot.safetensors")
        write_weights(trainer, state, path, "MergeOnFitEnd base snapshot")
        self._snapshot_path = str(path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_merge.callbacks.averaging import CheckpointAveraging
        from lightning_merge.callbacks.capture import CurvatureCapture
        from lightning_merge.formats.sidecar import sidecar_path
        from lightning_merge.sources.expert import Expert

        capture = next((c for c in trainer.callbacks if isinstance(c, CurvatureCapture)), None)
        if self._adapter is not None:
            statistics = capture.finalize(after_fit=True) if capture is not None else None  # every rank
            self._merge_lora(trainer, statistics)
            return
        averaging = next((c for c in trainer.callbacks if isinstance(c, CheckpointAveraging)), None)
        out: Any = self.out or join(self._dir(trainer), "merged.safetensors")
        out = out if is_url(out) else Path(out)
        check_not_an_input(out, [*self.experts, *([self.base] if isinstance(self.base, (str, os.PathLike)) else []),
                                 *([self._snapshot_path] if self._snapshot_path else [])])
        state = module_state(trainer, pl_module)  # every rank
        written: list[str] = []  # files of this merge's own, removed once it is written
        if holds_shards(state):
            # The trained model (or its average) and its statistics as files, gathered tensor by tensor: rank 0
            # reads them lazily while it merges, and no rank holds the whole model.
            trained_path = join(self._dir(trainer), "merge_trained.safetensors")
            if averaging is not None:
                source = averaging.averaged_file(trainer)
            else:
                write_weights(trainer, state, trained_path, "MergeOnFitEnd trained weights")
                source = trained_path
                written.append(trained_path)
            statistics: Any = None
            if capture is not None:
                statistics = str(sidecar_path(trained_path))
                capture.save(statistics)
                written.append(statistics)

            def trained() -> Expert:
                return Expert(source, statistics=statistics, name="trained")
        else:
            statistics = capture.finalize(after_fit=True) if capture is not None else None  # every rank
            if averaging is not None:  # the average is the trained model: computed now if its hook has not run
                state = averaging.average(trainer)

            def trained() -> Expert:
                return Expert({k: v.detach().cpu() for k, v in state.items()}, statistics=statistics, name="trained")

        def merge_and_write() -> None:
            try:
                self._merge(trained(), out, trainer, pl_module)
            finally:
                for path in written:
                    remove_output(path)
            rank_zero_info(f"MergeOnFitEnd: merged {1 + len(self.experts)} experts with {self.strategy.name} → {out}")

        on_rank_zero(trainer, merge_and_write, "MergeOnFitEnd: the merge")  # every rank raises if it fails
        self.merged_path = str(out)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Loaded here, after every callback's on_train_end, so that those still see the trained weights (a
        # CurvatureCapture saves them as final.safetensors). Every rank reads the same file: no collective; a
        # sharded module's ranks each keep their shard.
        if self.load_merged and self.merged_path is not None and self._adapter is not None:
            from lightning_merge.tools.peft_runs import load_adapter

            load_adapter(self._adapter, self.merged_path, self.adapter_name)
            rank_zero_info(f"MergeOnFitEnd: the module's active adapter is now {self.adapter_name!r} (the merge)")
        elif self.load_merged and self.merged_path is not None:
            from lightning_merge.sources.expert import Expert

            load_weights(pl_module, Expert(self.merged_path), "MergeOnFitEnd")

    # -- merging -------------------------------------------------------------------------------------------------
    def _merge_lora(self, trainer: pl.Trainer, statistics: Any) -> None:
        """Merge the trained adapter (or CheckpointAveraging's averaged adapter) with the other adapters in ΔW space
        and write the merged adapter folder (rank 0; every rank raises if it fails)."""
        from lightning_merge.callbacks.averaging import CheckpointAveraging
        from lightning_merge.engine.run import merge
        from lightning_merge.sources.expert import Expert
        from lightning_merge.tools.peft_runs import adapter_expert, live_expert

        adapter = self._adapter
        averaging = next((c for c in trainer.callbacks if isinstance(c, CheckpointAveraging)), None)
        averaged = averaging.average_adapter(trainer) if averaging is not None else None  # every rank
        out: Any = self.out or join(self._dir(trainer), "merged.adapter")
        out = out if is_url(out) else Path(out)
        check_not_an_input(out, [*self.experts, *([averaged] if averaged else [])])

        def merge_and_write() -> None:
            trained = (Expert(averaged, base=adapter.base, name="trained (averaged)") if averaged is not None
                       else live_expert(adapter, name="trained", statistics=statistics))
            others = [adapter_expert(path, adapter, "MergeOnFitEnd") for path in self.experts]
            merge([trained, *others], adapter.base, self.strategy, out=out, output="peft", rank=self.rank,
                  include=self.include, exclude=self.exclude, on_missing_statistic=self.on_missing_statistic,
                  overwrite=True)  # replaces only an earlier output of lightning-merge (files.ownership)
            if self.log_report and trainer.loggers:
                self._log(trainer, [trained, *others], adapter.base)
            rank_zero_info(f"MergeOnFitEnd: merged {1 + len(self.experts)} adapters with {self.strategy.name} in ΔW "
                           f"space → {out}")

        on_rank_zero(trainer, merge_and_write, "MergeOnFitEnd: the merge")
        self.merged_path = str(out)

    def _merge(self, trained: Any, out: Any, trainer: Any, pl_module: Any) -> None:
        """Merge ``trained`` with the other experts into ``out`` (rank 0). A ``.safetensors`` output is streamed
        tensor by tensor; a ``.ckpt`` is written from the merged state dict in memory."""
        from lightning_merge.engine.run import merge
        from lightning_merge.sources.expert import Expert

        others = [Expert(path) for path in self.experts]
        if self.base is not None:
            base = Expert(self.base)
        elif self._snapshot_state is not None:
            base = Expert(self._snapshot_state, name="fit-start snapshot")
        else:
            base = Expert(self._snapshot_path)
        # Tensors left out of the merge keep the module's own values (its head), not the base's; tensors the base
        # lacks keep the module's too.
        common = dict(base=base, strategy=self.strategy, include=self.include, exclude=self.exclude,
                      on_missing_statistic=self.on_missing_statistic, on_missing="union", unmerged_from="first",
                      progress=False)
        if str(out).endswith(".safetensors"):
            merge([trained, *others], out=out, overwrite=True, **common)
        else:
            self._save_checkpoint(merge([trained, *others], **common), out, trainer, pl_module)
        if self.log_report and trainer is not None and trainer.loggers:
            self._log(trainer, [trained, *others], base)

    def _log(self, trainer: Any, experts: list[Any], base: Any) -> None:
        """The merge's diagnosis (an extra read pass over the experts) to the Trainer's loggers."""
        from lightning_merge.callbacks._logging import log_to_loggers, report_summary
        from lightning_merge.tools.diagnostics import report

        diagnosis = report(experts, base, self.strategy, include=self.include, exclude=self.exclude,
                           on_missing_statistic=self.on_missing_statistic, progress=False)
        log_to_loggers(trainer, "merge", report_summary(diagnosis.data), diagnosis.figures())

    def _save_checkpoint(
        self, merged: Mapping[str, Tensor], out: Path | str, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        """A weights-only Lightning checkpoint (``Module.load_from_checkpoint`` loads it; optimizer state is not
        kept: a merged model starts a new optimisation), written atomically."""
        from lightning_merge.files.checkpoint import new_checkpoint, write_checkpoint

        template = new_checkpoint(epoch=trainer.current_epoch, global_step=trainer.global_step)
        if pl_module.hparams:
            template[pl_module.CHECKPOINT_HYPER_PARAMS_KEY] = dict(pl_module.hparams)
        record = {"strategy": self.strategy.to_dict(), "experts": ["<trained>", *(redact(e) for e in self.experts)]}
        write_checkpoint(out, merged, record, template=template, replace="own")  # replaces only an earlier merge

    def _dir(self, trainer: pl.Trainer) -> str:
        return self.dirpath or trainer.default_root_dir


__all__ = ["MergeOnFitEnd"]
