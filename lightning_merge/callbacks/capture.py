"""``CurvatureCapture``: keep the curvature signal a fine-tuning run computes anyway.

What it records, per trainable parameter (names as in the LightningModule's ``state_dict``):

- ``exp_avg_sq``: Adam's second moments, read from the optimizer state when a checkpoint is saved and at fit end,
  with β₂ and the per-parameter step for bias correction at merge time (:mod:`lightning_merge.capture.second_moments`).
- ``fisher.batch``: the batch-empirical diagonal Fisher, the mean (or an exponential moving average) over optimizer
  steps of wₜ·gₜ², gₜ the gradient the optimizer sees in ``on_before_optimizer_step`` (after AMP unscaling, gradient
  accumulation and DDP averaging) and wₜ the step's own scale from its counted sequences and predicted tokens, so
  token-mean losses (Hugging Face's) give the per-sequence Fisher (:mod:`lightning_merge.capture.fisher_accumulator`);
  steps with non-finite gradients are skipped and counted.
- ``fisher.example`` / ``fisher.true``: optionally, after fit, the per-example empirical or the sampled true
  Fisher over a dataloader (:mod:`lightning_merge.capture.post_fit`, :mod:`lightning_merge.capture.fisher`).
- ``gram``: optionally, each trained linear layer's input Gram matrix Σ xxᵀ (the statistic of
  :class:`~lightning_merge.RegMean`), during training or after the fit (:mod:`lightning_merge.capture.grams`).

Where it goes: a sidecar ``X.statistics.safetensors`` next to every checkpoint ``X.ckpt`` the Trainer writes
(ModelCheckpoint's top-k and ``last``, ``trainer.save_checkpoint``, OnExceptionCheckpoint), deleted when
ModelCheckpoint rotates ``X.ckpt`` away (:mod:`._sidecars`), and ``final.safetensors`` +
``final.statistics.safetensors`` at fit end (a PEFT model: adapter folders, :mod:`lightning_merge.formats.adapter`).
See docs/capture.md and docs/format.md.

The callback holds the Trainer's hooks; its settings are a :class:`~lightning_merge.capture.config.CaptureConfig`,
and what it records and stores is a :class:`~lightning_merge.capture.recorder.Recorder`, which knows no Lightning.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_merge.callbacks._distributed import on_rank_zero
from lightning_merge.callbacks._sidecars import SidecarCheckpointIO, SidecarWriter
from lightning_merge.callbacks._trained import save_weights
from lightning_merge.capture.config import CaptureConfig
from lightning_merge.capture.fisher import batch_counts, protocol_refusal
from lightning_merge.capture.fisher_accumulator import BatchCounts
from lightning_merge.capture.grams import GramAccumulator, gram_modules
from lightning_merge.capture.post_fit import reduce_grams
from lightning_merge.capture.recorder import Recorder
from lightning_merge.capture.records import Collected, SidecarSnapshot
from lightning_merge.capture.second_moments import has_second_moments
from lightning_merge.capture.sharded import (
    SHARDED_IN_MEMORY,
    checkpoint_sidecar,
    fingerprints,
    local,
    sharded_refusal,
    wrap_save,
    write_adapter_gathered,
    write_final_gathered,
    write_statistics_gathered,
)
from lightning_merge.capture.sharding import (
    DEEPSPEED_REFUSAL,
    DTENSOR_SHARDINGS,
    holds_dtensors,
    is_deepspeed,
    sharding,
)
from lightning_merge.files.outputs import remove_output
from lightning_merge.files.remote import is_url, join
from lightning_merge.formats.adapter import (
    adapter_keys,
    adapter_path,
    adapter_snapshot,
    find_adapter,
    rename_meta,
    write_adapter,
)
from lightning_merge.formats.sidecar import Statistics, sidecar_path, write_statistics


class CurvatureCapture(Callback):
    """Record Adam second moments and diagonal Fisher estimates while a model fine-tunes.

    Example::

        capture = CurvatureCapture(fisher_after_fit="example", fisher_examples=512)
        trainer = Trainer(callbacks=[capture, ModelCheckpoint(save_top_k=2, monitor="val_loss")])
        trainer.fit(model, datamodule=dm)
        stats = capture.finalize()          # merge-ready statistics of the model just trained
        # every checkpoint has its sidecar: epoch=3-step=120.statistics.safetensors
        # and the run's end: <dirpath>/final.safetensors + final.statistics.safetensors

    Args:
        second_moments: record Adam's ``exp_avg_sq`` (any optimizer whose state carries it: Adam, AdamW,
            NAdam, RAdam...). With an optimizer that has none (SGD), capturing only second moments is an error;
            with the Fisher also on, a warning.
        fisher: record the batch-empirical Fisher during training.
        loss_reduction: how the training loss reduces, so the batch Fisher estimates the per-example
            (per-sequence) Fisher: ``"auto"`` (a token mean for mapping batches whose ``labels`` have a position
            axis, as Hugging Face's losses; else a mean over examples), ``"example_mean"``, ``"token_mean"`` or
            ``"sum"``. A module's ``fisher_counts(batch) -> (sequences, tokens)`` overrides it.
        fisher_start_step: first optimizer step (``trainer.global_step``) whose gradients are recorded.
        fisher_every_n_steps: record every n-th optimizer step from ``fisher_start_step`` on.
        fisher_ema_decay: ``None`` averages over the whole run; a decay d in (0, 1) keeps an exponential moving
            average F ← d·F + (1 − d)·wg², bias-corrected at merge time like Adam's.
        fisher_after_fit: ``"example"`` (per-example empirical), ``"true"`` (labels sampled from the model) or
            ``"exact"`` (the expectation over every class: classifiers with one label per example) computed once
            when the fit ends, over ``fisher_loader``; ``None`` for none.
        fisher_loader: ``"val"``, ``"train"`` or ``"test"`` (the Trainer's dataloaders) or, from Python, any
            iterable of batches (under DDP each rank then reads every world_size-th batch); the post-fit passes
            (``fisher_after_fit`` and ``gram="after_fit"``) read it.
        fisher_examples: the number of examples M of the post-fit passes (over all ranks).
        fisher_samples: label draws per example for the true Fisher.
        compression: storage of the statistics: ``"float32"``, ``"bfloat16"`` or ``"rank1"`` (row and column
            sums of 2-D statistics, Adafactor style). Lossy choices also store float32 accumulators in
            checkpoint sidecars, so a resumed run stays exact.
        checkpoint_sidecars: write a sidecar next to every checkpoint the Trainer saves; for a PEFT model also the
            adapter folder ``X.adapter/`` (weights, config, statistics keyed like the adapter), rotated with ``X.ckpt``.
        save_final: at fit end write the trained model and its statistics: ``True`` writes, for a PEFT model, the
            adapter folder ``final.adapter/`` (no full-model copy), else ``final.safetensors`` and
            ``final.statistics.safetensors``; ``"full"`` writes the full model in either case (a PEFT model's base and
            adapter weights, as its ``state_dict`` names them); ``"adapter"`` requires a PEFT model; False writes
            nothing.
        adapter: the PEFT adapter to save (default: the model's active adapter).
        dirpath: folder of the final files; default: the ModelCheckpoint's folder, else the Trainer's
            ``default_root_dir``.
        async_write: write checkpoint sidecars in a background thread (the training loop waits only for a copy
            of the statistics); writes are joined before their checkpoint is removed and at fit end.
        seed: seed of the true Fisher's label draws.
        gram: record each trained ``nn.Linear``'s input Gram matrix Σ xxᵀ for :class:`~lightning_merge.RegMean`:
            ``"after_fit"`` over ``fisher_examples`` examples of ``fisher_loader`` when the fit ends (eval mode, no
            gradients; FusionBench's RegMean uses 256 examples), ``"train"`` over every training forward (costs
            about one more matmul per layer and step), or None. Rows are the input's flattened leading axes
            (tokens of a sequence model); a mapping batch's ``attention_mask`` leaves padding out. For a PEFT model
            the layers are the adapters' ``lora_A`` (whose input is the adapted module's: RegMean's) and ``lora_B``.
        gram_form: how Gram matrices are stored: ``"full"`` (in × in floats per layer), ``"diagonal"`` (in floats:
            RegMean then weighs input features without their correlations) or ``"lowrank"`` (the ``gram_rank``
            leading eigenpairs and the exact diagonal), for large layers.
        gram_rank: the rank kept by ``gram_form="lowrank"``.
    """

    def __init__(
        self,
        second_moments: bool = True,
        fisher: bool = True,
        loss_reduction: Literal["auto", "example_mean", "token_mean", "sum"] = "auto",
        fisher_start_step: int = 0,
        fisher_every_n_steps: int = 1,
        fisher_ema_decay: float | None = None,
        fisher_after_fit: Literal["example", "true", "exact"] | None = None,
        fisher_loader: Literal["val", "train", "test"] | Iterable[Any] = "val",
        fisher_examples: int = 512,
        fisher_samples: int = 1,
        compression: Literal["float32", "bfloat16", "rank1"] = "float32",
        checkpoint_sidecars: bool = True,
        save_final: bool | Literal["full", "adapter"] = True,
        adapter: str | None = None,
        dirpath: str | None = None,
        async_write: bool = True,
        seed: int = 0,
        gram: Literal["train", "after_fit"] | None = None,
        gram_form: Literal["full", "diagonal", "lowrank"] = "full",
        gram_rank: int = 64,
    ) -> None:
        super().__init__()
        self.config = CaptureConfig(
            second_moments=second_moments, fisher=fisher, loss_reduction=loss_reduction,
            fisher_start_step=fisher_start_step, fisher_every_n_steps=fisher_every_n_steps,
            fisher_ema_decay=fisher_ema_decay, fisher_after_fit=fisher_after_fit, fisher_loader=fisher_loader,
            fisher_examples=fisher_examples, fisher_samples=fisher_samples, compression=compression,
            checkpoint_sidecars=checkpoint_sidecars, save_final=save_final, adapter=adapter, dirpath=dirpath,
            async_write=async_write, seed=seed, gram=gram, gram_form=gram_form, gram_rank=gram_rank,
        )
        self._recorder = Recorder(self.config, rank_zero_warn)
        self._trainer: pl.Trainer | None = None
        self._names: dict[int, str] = {}
        self._counts = BatchCounts()
        self._token: str | None = None
        self._pending: dict[str, Collected] = {}
        self._sidecars = SidecarWriter(self._write_sidecar, self.async_write)
        self._resume_path: str | None = None
        self._module_names: set[str] | None = None
        self._final: Statistics | None = None
        self._final_key: tuple | None = None
        self._peft: Any = None
        self._adapter_keys: dict[str, str] = {}
        self._grams: GramAccumulator | None = None
        self._sharded = False  # DTensor parameters (FSDP2): see lightning_merge.capture.sharded

    # -- state --------------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:  # picklable for ddp_spawn: drop threads, locks and the trainer
        state = self.__dict__.copy()
        for key in ("_trainer", "_sidecars", "_pending", "_final", "_peft", "_grams"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._trainer = None
        self._pending = {}
        self._final = None
        self._peft = None
        self._grams = None
        self._sidecars = SidecarWriter(self._write_sidecar, self.async_write)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(compression=self.compression)

    def state_dict(self) -> dict[str, Any]:
        """Plain values (counts, the token that pairs a checkpoint with its sidecar, the base fingerprint); the
        float32 accumulators travel in the checkpoint's sidecar."""
        self._token = f"{self._recorder.batch_fisher.steps}-{uuid.uuid4().hex}"
        return self._recorder.state_dict(self._token)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._recorder.load_state_dict(state_dict, self._resume_path, self._module_names, self._shard_as())

    def _shard_as(self) -> dict[str, Tensor] | None:
        """``{name: parameter}`` of a sharded module (its statistics are laid out as its parameters), else None."""
        return dict(self._trainer.lightning_module.named_parameters()) if self._sharded and self._trainer else None

    # -- hooks ---------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if is_deepspeed(trainer.strategy):
            raise ValueError(DEEPSPEED_REFUSAL)
        if stage == "fit" and (self.fisher_after_fit is not None or self.gram == "after_fit"):
            setting = (f"fisher_after_fit={self.fisher_after_fit!r}" if self.fisher_after_fit is not None
                       else "gram='after_fit'")
            refusal = protocol_refusal(pl_module, f"CurvatureCapture({setting})")
            if refusal is not None:  # refused now, not after the whole fit
                raise ValueError(refusal)
        if stage == "fit" and self.checkpoint_sidecars:
            io = trainer.strategy.checkpoint_io
            if not isinstance(io, SidecarCheckpointIO):
                trainer.strategy.checkpoint_io = SidecarCheckpointIO(io, self)
            else:
                io.owner = self

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._resume_path = str(trainer.ckpt_path) if trainer.ckpt_path else None
        self._module_names = {n for n, _ in pl_module.named_parameters()}
        self._sharded = holds_dtensors(pl_module, trainer.strategy)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        kind = sharding(pl_module, trainer.strategy)  # the one place that tells "sharded, and how"
        self._sharded = kind in DTENSOR_SHARDINGS
        self._names = {id(p): n for n, p in pl_module.named_parameters()}
        self._peft, self._adapter_keys = find_adapter(pl_module, self.adapter)
        refusal = sharded_refusal(kind, fisher=self.fisher)
        if refusal is not None:
            raise ValueError(refusal)
        if self._sharded and self.checkpoint_sidecars:  # every rank takes part in gathering a sidecar
            wrap_save(trainer.strategy, lambda checkpoint, path: self.after_save(checkpoint, path, collective=True))
        if self.save_final == "adapter" and self._peft is None:
            raise ValueError("CurvatureCapture(save_final='adapter'): the module holds no PEFT model (peft.PeftModel)")
        self._check_final_outputs(trainer)
        self._recorder.new_fit()
        if self.gram is not None:
            layers = gram_modules(pl_module)
            if not layers:  # checked now, not when the fit ends
                raise ValueError(
                    f"CurvatureCapture(gram={self.gram!r}): the module has no trained nn.Linear layer to record input "
                    "Gram matrices of (RegMean merges linear layers; GPT-2's Conv1D layers are not supported)"
                )
        if self.gram == "train":
            # a training forward is one of the LightningModule in training mode with gradients on: a sub-module put
            # in eval mode (to switch its dropout off) still sees training inputs
            self._grams = GramAccumulator(layers, when=lambda m: pl_module.training and torch.is_grad_enabled())
            self._grams.attach()
        self._counts.reset()
        if not self._recorder.fingerprint and trainer.ckpt_path is None:  # a fresh fit: the base it starts from
            self._recorder.fingerprint = fingerprints(pl_module.named_parameters())  # sharded: gathered one by one
        self._final = None

    def _check_final_outputs(self, trainer: pl.Trainer) -> None:
        """Refuse before training what the fit's end would refuse (files.ownership): a ``final.adapter`` /
        ``final.safetensors`` that lightning-merge did not write (a PEFT ``save_pretrained`` folder, a user's file)
        raises ``ForeignOutput`` now, not after the fit; an earlier output of lightning-merge is replaced, and the
        log says so."""
        if not self.save_final:  # every rank checks (the same path): all raise together, none waits for rank 0
            return
        root = self.config.final_dir(getattr(trainer.checkpoint_callback, "dirpath", None), trainer.default_root_dir)
        if is_url(root):
            return  # object storage: checked when uploaded (conditional writes)
        adapter = self._peft is not None and self.config.writes_adapter()
        targets = [Path(root) / "final.adapter"] if adapter else []
        if self.config.writes_full_model(peft=self._peft is not None):
            targets += [Path(root) / "final.safetensors", Path(sidecar_path(Path(root) / "final.safetensors"))]
        from lightning_merge.files.ownership import refuse_foreign

        for target in targets:
            if os.path.lexists(target):
                refuse_foreign(target)
                rank_zero_info(f"CurvatureCapture: {target} is an earlier output of lightning-merge; this fit's end "
                               "replaces it")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.second_moments:
            return
        lacking = [type(o).__name__ for o in trainer.optimizers if not has_second_moments(o)]
        if lacking:
            message = (
                f"CurvatureCapture(second_moments=True): {', '.join(lacking)} keeps no second moments "
                "(exp_avg_sq); use Adam/AdamW, or pass second_moments=False"
            )
            if not self.fisher and self.fisher_after_fit is None:
                raise ValueError(message + " and capture the Fisher instead (fisher=True)")
            rank_zero_warn(message + "; capturing the Fisher only")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.fisher:
            self._counts.add(*batch_counts(batch, pl_module, self.loss_reduction))
        if self._grams is not None:
            self._grams.set_batch(batch)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._sidecars.wait()  # pending sidecars reference the live accumulators and optimizer state
        if not self.fisher:
            return
        counts, self._counts = self._counts, BatchCounts()
        step = trainer.global_step
        if step < self.fisher_start_step or (step - self.fisher_start_step) % self.fisher_every_n_steps:
            return

        def reduce(t: Tensor) -> Tensor:  # every rank reaches this line on every recorded step
            return trainer.strategy.reduce(t.to(pl_module.device), reduce_op="sum").cpu()

        batch_fisher = self._recorder.batch_fisher
        named: list[tuple[str, Tensor]] = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) in self._names:
                    named.append((self._names[id(p)], local(p.grad)))  # FSDP2: the local shard of g
        # Sharded gradients: every rank must skip the same steps, and a shard elsewhere may be the non-finite one,
        # so this rank's verdict travels with the counts, in the one reduction a recorded step makes.
        weight, sequences, tokens, finite = batch_fisher.step_totals(
            counts, trainer.world_size, trainer.accumulate_grad_batches, reduce,
            finite=batch_fisher.finite(named) if self._sharded else True,
        )
        if weight <= 0 or not named:
            return
        if batch_fisher.step(named, weight, sequences, tokens, finite if self._sharded else None):
            self._final = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._grams is not None and self.checkpoint_sidecars:
            self._total_grams(trainer)  # every rank: the sums are reduced over ranks
        if not self.checkpoint_sidecars or not trainer.is_global_zero or self._token is None or self._sharded:
            return
        # No copy: the live tensors are written as they are, and the next mutation (our accumulation and the
        # optimizer's step, both after ``on_before_optimizer_step``) waits for the write (SidecarWriter.wait).
        self._pending[self._token] = self._collect(trainer, checkpoint.get("optimizer_states"), resume=True, copy=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_post_fit(trainer, pl_module)
        if self._grams is not None:
            self._total_grams(trainer)
        if self._sharded:  # every rank gathers the module's own DTensors, on their devices, one at a time
            self._final = None
            self._sidecars.flush()
            if self.save_final:
                self._write_final_sharded(trainer, pl_module)
            return
        full = self.config.writes_full_model(peft=self._peft is not None)
        state = trainer.strategy.lightning_module_state_dict() if full else None  # all ranks (FSDP)
        self._final = None

        adapter = adapter_snapshot(self._peft, self.adapter) if self.config.writes_adapter() else None

        def write_final() -> None:
            self._sidecars.flush()
            if not self.save_final:
                return
            root = self.config.final_dir(getattr(trainer.checkpoint_callback, "dirpath", None),
                                         trainer.default_root_dir)
            directory: Any = root if is_url(root) else Path(root)
            collected = self._collect(trainer, None, resume=False)
            if adapter is not None:
                folder = join(root, "final.adapter") if is_url(root) else directory / "final.adapter"
                write_adapter(folder, adapter, collected.statistics, collected.kinds, keys=self._adapter_keys,
                              compression=self.compression, metadata=self._recorder.metadata(trainer.global_step))
                rank_zero_info(f"CurvatureCapture: wrote the adapter {folder} with its statistics")
                return
            weights = join(root, "final.safetensors") if is_url(root) else directory / "final.safetensors"
            save_weights(state, weights)
            write_statistics(sidecar_path(weights), collected.statistics, collected.kinds,
                             compression=self.compression, metadata=self._recorder.metadata(trainer.global_step))
            rank_zero_info(f"CurvatureCapture: wrote {weights} and its statistics")

        # Every rank leaves together, or every rank raises: none tears down while rank 0 still writes.
        on_rank_zero(trainer, write_final, "CurvatureCapture: writing final.safetensors")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._sidecars.flush()
        if self._grams is not None:
            self._grams.detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._sidecars.flush()

    def _write_final_sharded(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """final.safetensors and its statistics of a sharded module, or a PEFT model's final.adapter/, gathered
        tensor by tensor (every rank)."""
        root = Path(self.config.final_dir(getattr(trainer.checkpoint_callback, "dirpath", None),
                                          trainer.default_root_dir))
        collected = self._collect(trainer, None, resume=False)
        metadata = self._recorder.metadata(trainer.global_step)
        if self._peft is not None and not self.config.writes_full_model(peft=True):
            folder = root / "final.adapter"
            write_adapter_gathered(folder if trainer.is_global_zero else None, self._peft, self.adapter,
                                   collected.statistics, collected.kinds, keys=self._adapter_keys,
                                   compression=self.compression, metadata=metadata, share=trainer.strategy.broadcast)
            rank_zero_info(f"CurvatureCapture: wrote the adapter {folder} with its statistics")
            return
        weights = root / "final.safetensors"
        state = pl_module.state_dict()
        write_final_gathered(weights if trainer.is_global_zero else None, state, collected.statistics, collected.kinds,
                             compression=self.compression, metadata=metadata, share=trainer.strategy.broadcast)
        rank_zero_info(f"CurvatureCapture: wrote {weights} and its statistics")

    # -- after fit -----------------------------------------------------------------------------------------------
    def _ensure_post_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute the post-fit Fisher and Gram matrices once per fit (every rank must call this: it reduces across
        ranks); see :meth:`Recorder.post_fit`."""
        if self._recorder.post_fit(trainer, pl_module):
            self._final = None

    def _total_grams(self, trainer: pl.Trainer) -> None:
        """The training-time Σ xxᵀ over every rank and the restored checkpoint (every rank must call it)."""
        assert self._grams is not None
        self._recorder.total_grams(reduce_grams(trainer, self._grams.modules, self._grams.sums, self._grams.rows))
        self._final = None

    # -- collection -----------------------------------------------------------------------------------------------
    def _collect(self, trainer: pl.Trainer, optimizer_states: list[dict] | None, resume: bool,
                 copy: bool = True) -> Collected:
        """A CPU float32 copy of everything to store (:meth:`Recorder.collect`). The Gram sums stored are the
        post-fit pass's, or the training-time sums (one process: current; under DDP: as of the last all-rank
        reduction, at the last checkpoint or the fit's end)."""
        if self.gram == "train" and self._grams is not None and trainer.world_size == 1:
            self._total_grams(trainer)
        module = trainer.lightning_module
        fsdp1 = self.second_moments and sharding(module, trainer.strategy) == "fsdp1"
        run = {"accumulate_grad_batches": trainer.accumulate_grad_batches, "world_size": trainer.world_size,
               "precision": trainer.precision}
        return self._recorder.collect(
            trainer.optimizers, self._names, run, optimizer_states=optimizer_states,
            index_names=[n for n, _ in module.named_parameters()] if fsdp1 else None, resume=resume, copy=copy,
            shard_as=self._shard_as(),
        )

    # -- public --------------------------------------------------------------------------------------------------
    def finalize(self, after_fit: bool = False) -> Statistics:
        """The statistics of the model as it is now (merge-ready through :meth:`Statistics.get`), in memory.

        Idempotent: calling it again without further training returns the same object. Used by the merge
        callbacks to merge the model just trained without re-reading its sidecar.

        Args:
            after_fit: also compute the post-fit Fisher (``fisher_after_fit``) now if it has not been computed
                yet: for callbacks whose ``on_train_end`` may run before this one's. Under DDP every rank must
                call it then.
        """
        if self._trainer is None:
            raise RuntimeError("CurvatureCapture.finalize() needs a fit first (the callback has seen no Trainer)")
        if self._sharded:
            raise NotImplementedError(SHARDED_IN_MEMORY.format("finalize()"))
        if after_fit:
            self._ensure_post_fit(self._trainer, self._trainer.lightning_module)
        recorder = self._recorder
        key = (self._trainer.global_step, recorder.batch_fisher.steps, tuple(recorder.post),
               sum(self._grams.rows.values()) if self._grams is not None else 0, recorder.gram_totals is None)
        if self._final is None or self._final_key != key:
            collected = self._collect(self._trainer, None, resume=False)
            tensors = {f"{kind}/{name}": t for kind, per in collected.statistics.items() for name, t in per.items()}
            self._final = Statistics(tensors, {**collected.kinds}, origin="CurvatureCapture.finalize()")
            self._final.metadata = self._recorder.metadata(self._trainer.global_step)
            self._final_key = key
        return self._final

    def save(self, path: str | os.PathLike, names: Mapping[str, str] | None = None) -> Path:
        """Write the current statistics to a sidecar file ``path`` (atomically).

        Args:
            path: the file to write (``X.statistics.safetensors`` pairs with ``X.ckpt`` / ``X.safetensors``).
            names: optional renaming ``{module parameter name: stored name}``; parameters not in it are left out.

        On a sharded (FSDP2) module every rank must call it: the statistics are gathered tensor by tensor and rank 0
        writes the file (the same file one process writes).
        """
        if self._trainer is None:
            raise RuntimeError("CurvatureCapture.save() needs a fit first")
        if self._sharded and self._grams is not None:
            self._total_grams(self._trainer)  # every rank: the Gram sums are reduced over ranks
        collected = self._collect(self._trainer, None, resume=False)
        statistics, kinds = collected.statistics, collected.kinds
        if names is not None:
            statistics = {k: {names[n]: t for n, t in per.items() if n in names} for k, per in statistics.items()}
            kinds = {k: rename_meta(meta, names) for k, meta in kinds.items()}
        metadata = self._recorder.metadata(self._trainer.global_step)
        if self._sharded:  # every rank gathers, rank 0 writes
            trainer = self._trainer
            write_statistics_gathered(path if trainer.is_global_zero else None, statistics, kinds,
                                      compression=self.compression, metadata=metadata,
                                      share=trainer.strategy.broadcast)
            return Path(path)
        return write_statistics(path, statistics, kinds, compression=self.compression, metadata=metadata)

    def save_adapter_statistics(
        self, peft_model: torch.nn.Module, folder: str | os.PathLike, adapter_name: str = "default"
    ) -> Path:
        """Write ``statistics.safetensors`` into a PEFT adapter folder, keyed like ``adapter_model.safetensors``.

        Call it after ``peft_model.save_pretrained(folder)``; the statistics then travel with the adapter
        (``PeftModel.from_pretrained`` ignores the extra file).

        Args:
            peft_model: the ``PeftModel`` (or the module holding its LoRA parameters) that was trained.
            folder: the adapter folder.
            adapter_name: the adapter whose parameters to store (its name is stripped from the keys, as PEFT does).
        """
        if self._trainer is None:
            raise RuntimeError("save_adapter_statistics() needs a fit first")
        names = adapter_keys(peft_model, self._trainer.lightning_module, adapter_name)
        if not names:
            raise ValueError(
                f"none of the adapter '{adapter_name}' parameters belong to the module this capture watched; pass the "
                "PeftModel that was trained"
            )
        return self.save(Path(folder) / "statistics.safetensors", names=names)

    def wait(self) -> None:
        """Block until every sidecar written in the background is on disk (re-raises a failed write)."""
        self._sidecars.flush()

    # -- sidecar I/O (called by SidecarCheckpointIO) -----------------------------------------------------------------
    def after_save(self, checkpoint: dict, path: str, collective: bool = False) -> None:
        """Write the sidecar (and adapter folder) of the checkpoint just saved at ``path``; a sharded module's is
        gathered by every rank (``collective``, called by the strategy's wrapped ``save_checkpoint``)."""
        if collective != self._sharded:
            return
        state = checkpoint.get("callbacks", {}).get(self.state_key, {})
        token = state.get("token")
        if self._sharded:
            trainer = self._trainer
            assert trainer is not None
            collected = self._collect(trainer, None, resume=True, copy=False)
            metadata = self._recorder.metadata(trainer.global_step, token)
            if collected.statistics:
                write_statistics_gathered(checkpoint_sidecar(path) if trainer.is_global_zero else None,
                                          collected.statistics, collected.kinds, compression=self.compression,
                                          resume=collected.resume, share=trainer.strategy.broadcast,
                                          metadata=metadata)
            if self._peft is not None:  # X.adapter/ beside the checkpoint folder, gathered the same way
                folder = adapter_path(path)
                write_adapter_gathered(Path(folder) if trainer.is_global_zero else None, self._peft, self.adapter,
                                       collected.statistics, collected.kinds, keys=self._adapter_keys,
                                       compression=self.compression, metadata=metadata,
                                       share=trainer.strategy.broadcast)
            return
        collected = self._pending.pop(token, None) if token else None
        if collected is None:  # a weights-only save: no callback state, take the statistics now
            assert self._trainer is not None
            collected = self._collect(self._trainer, None, resume=False, copy=False)
        self._pending.clear()
        if collected.statistics or self._peft is not None:  # metadata and adapter now: the step moves on meanwhile
            metadata = self._recorder.metadata(self._trainer.global_step, token)
            self._sidecars.save(path, SidecarSnapshot(collected, metadata, adapter_snapshot(self._peft, self.adapter),
                                                      path))

    def after_remove(self, path: str) -> None:
        """Delete the sidecar (and adapter folder) of the checkpoint just removed from ``path``."""
        self._sidecars.remove(path)
        folder = adapter_path(path)
        if not isinstance(folder, str) or self._peft is not None:
            remove_output(folder)  # the adapter saved beside it, if this capture wrote it

    def _write_sidecar(self, target: Path, snapshot: SidecarSnapshot) -> None:
        collected = snapshot.collected
        if collected.statistics:
            write_statistics(target, collected.statistics, collected.kinds, compression=self.compression,
                             resume=collected.resume, metadata=snapshot.metadata)
        if snapshot.adapter is not None:
            write_adapter(adapter_path(snapshot.checkpoint), snapshot.adapter, collected.statistics, collected.kinds,
                          keys=self._adapter_keys, compression=self.compression, metadata=snapshot.metadata)


def _setting(name: str) -> property:
    return property(lambda self: getattr(self.config, name), doc=f"The ``{name}`` setting (read-only: see "
                    ":class:`~lightning_merge.capture.config.CaptureConfig`).")


for _field in dataclasses.fields(CaptureConfig):  # capture.fisher, capture.gram, ...: the settings, read from config
    setattr(CurvatureCapture, _field.name, _setting(_field.name))


__all__ = ["CurvatureCapture"]
