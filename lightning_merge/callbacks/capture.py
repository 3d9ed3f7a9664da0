"""``CurvatureCapture``: keep the curvature signal a fine-tuning run computes anyway.

What it records, per trainable parameter (names as in the LightningModule's ``state_dict``):

- ``exp_avg_sq``: Adam's second moments, read from the optimizer state when a checkpoint is saved and at fit end,
  with β₂ and the per-parameter step for bias correction at merge time (:mod:`._second_moments`).
- ``fisher.batch``: the batch-empirical diagonal Fisher, the mean (or an exponential moving average) over optimizer
  steps of wₜ·gₜ², gₜ the gradient the optimizer sees in ``on_before_optimizer_step`` (after AMP unscaling, gradient
  accumulation and DDP averaging) and wₜ the step's own scale from its counted sequences and predicted tokens, so
  token-mean losses (Hugging Face's) give the per-sequence Fisher (:mod:`._fisher_accumulator`); steps with
  non-finite gradients are skipped and counted.
- ``fisher.example`` / ``fisher.true``: optionally, after fit, the per-example empirical or the sampled true
  Fisher over a dataloader (:mod:`._post_fit`, :mod:`lightning_merge.capture.fisher`).
- ``gram``: optionally, each trained linear layer's input Gram matrix Σ xxᵀ (the statistic of
  :class:`~lightning_merge.RegMean`), during training or after the fit (:mod:`lightning_merge.capture.grams`).

Where it goes: a sidecar ``X.statistics.safetensors`` next to every checkpoint ``X.ckpt`` the Trainer writes
(ModelCheckpoint's top-k and ``last``, ``trainer.save_checkpoint``, OnExceptionCheckpoint), deleted when
ModelCheckpoint rotates ``X.ckpt`` away (:mod:`._sidecars`), and ``final.safetensors`` +
``final.statistics.safetensors`` at fit end. See docs/capture.md and docs/format.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
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
from lightning_merge.capture.fisher import ESTIMATORS, batch_counts
from lightning_merge.capture.fisher_accumulator import REDUCTIONS, BatchCounts, BatchFisher
from lightning_merge.capture.grams import GramAccumulator, gram_modules
from lightning_merge.capture.post_fit import LOADERS, MissingLoader, post_fit_fisher, post_fit_grams, reduce_grams
from lightning_merge.capture.second_moments import cpu_float, has_second_moments, read_second_moments
from lightning_merge.capture.sharded import (
    all_ranks,
    checkpoint_sidecar,
    fingerprints,
    holds_peft,
    like,
    local,
    shard_like,
    sharded_module,
    sharded_refusal,
    weights_items,
    wrap_save,
    write_gathered,
    write_statistics_gathered,
)
from lightning_merge.files.outputs import remove_output
from lightning_merge.files.remote import is_url, join, staged
from lightning_merge.formats.sidecar import (
    COMPRESSIONS,
    GRAM,
    GRAM_FORMS,
    RESUME_PREFIX,
    Statistics,
    StatisticsError,
    find_sidecar,
    sidecar_path,
    write_statistics,
)

STATE_VERSION = 2
SHARDED_IN_MEMORY = (
    "CurvatureCapture.{} is not supported on a sharded (FSDP2) module yet: its statistics are shards on each rank. "
    "read the sidecars the capture wrote (X.statistics.safetensors beside each checkpoint, "
    "final.statistics.safetensors)"
)


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
            the layers are the adapters' ``lora_A`` (their input is the adapted module's).
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
        if not second_moments and not fisher and fisher_after_fit is None and gram is None:
            raise ValueError(
                "CurvatureCapture records nothing: enable second_moments, fisher, fisher_after_fit or gram"
            )
        if gram not in (None, "train", "after_fit"):
            raise ValueError(f"gram must be 'train', 'after_fit' or None, got {gram!r}")
        if gram_form not in GRAM_FORMS:
            raise ValueError(f"gram_form must be one of {', '.join(GRAM_FORMS)}, got {gram_form!r}")
        if isinstance(gram_rank, bool) or not isinstance(gram_rank, int) or gram_rank < 1:
            raise ValueError(f"gram_rank must be an integer >= 1, got {gram_rank!r}")
        if loss_reduction not in REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {', '.join(REDUCTIONS)}, got {loss_reduction!r}")
        if fisher_start_step < 0:
            raise ValueError(f"fisher_start_step must be >= 0, got {fisher_start_step}")
        if fisher_every_n_steps < 1:
            raise ValueError(f"fisher_every_n_steps must be >= 1, got {fisher_every_n_steps}")
        if fisher_ema_decay is not None and not 0.0 < fisher_ema_decay < 1.0:
            raise ValueError(f"fisher_ema_decay must be in (0, 1) or None, got {fisher_ema_decay}")
        if fisher_after_fit is not None and fisher_after_fit not in ESTIMATORS:
            raise ValueError(
                f"fisher_after_fit must be one of {', '.join(ESTIMATORS)} or None, got {fisher_after_fit!r}"
            )
        if isinstance(fisher_loader, str) and fisher_loader not in LOADERS:
            raise ValueError(
                f"fisher_loader must be one of {', '.join(LOADERS)} or an iterable of batches, got {fisher_loader!r}"
            )
        if fisher_examples < 1:
            raise ValueError(f"fisher_examples must be >= 1, got {fisher_examples}")
        if fisher_samples < 1:
            raise ValueError(f"fisher_samples must be >= 1, got {fisher_samples}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
        if save_final not in (True, False, "full", "adapter"):
            raise ValueError(f"save_final must be True, False, 'full' or 'adapter', got {save_final!r}")
        self.second_moments = second_moments
        self.fisher = fisher
        self.loss_reduction = loss_reduction
        self.fisher_start_step = fisher_start_step
        self.fisher_every_n_steps = fisher_every_n_steps
        self.fisher_ema_decay = fisher_ema_decay
        self.fisher_after_fit = fisher_after_fit
        self.fisher_loader = fisher_loader
        self.fisher_examples = fisher_examples
        self.fisher_samples = fisher_samples
        self.compression = compression
        self.checkpoint_sidecars = checkpoint_sidecars
        self.save_final = save_final
        self.adapter = adapter
        self.dirpath = dirpath
        self.async_write = async_write
        self.seed = seed
        self.gram = gram
        self.gram_form = gram_form
        self.gram_rank = gram_rank
        self._reset()

    # -- state --------------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._batch_fisher = BatchFisher(self.fisher_ema_decay)
        self._fingerprint: dict[str, str] = {}
        self._restarted_at: int | None = None
        self._post: dict[str, tuple[dict[str, Tensor], int]] = {}
        # Σ xxᵀ restored from a checkpoint (global totals, added once after the ranks are reduced) and the last totals
        self._gram_restored: tuple[dict[str, Tensor], dict[str, int]] = ({}, {})
        self._gram_totals: tuple[dict[str, Tensor], dict[str, int], int] | None = None
        self._runtime()

    def _runtime(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._names: dict[int, str] = {}
        self._counts = BatchCounts()
        self._token: str | None = None
        self._pending: dict[str, tuple[dict, dict, dict]] = {}
        self._sidecars = SidecarWriter(self._write_sidecar, self.async_write)
        self._resume_path: str | None = None
        self._module_names: set[str] | None = None
        self._final: Statistics | None = None
        self._final_key: tuple | None = None
        self._peft: Any = None
        self._adapter_keys: dict[str, str] = {}
        self._grams: GramAccumulator | None = None
        self._left_out: set[str] = set()  # layers whose Gram matrix is left out (warned about once)
        self._sharded = False  # FSDP2: parameters are DTensor shards (see lightning_merge.capture.sharded)

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
        self._token = f"{self._batch_fisher.steps}-{uuid.uuid4().hex}"
        return {
            "version": STATE_VERSION,
            "token": self._token,
            "fisher": self._batch_fisher.state_dict(),
            "fingerprint": dict(self._fingerprint),
            "restarted_at": self._restarted_at,
            "gram": self.gram == "train",
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version", 0)
        if version > STATE_VERSION:
            raise StatisticsError(
                f"the checkpoint's CurvatureCapture state has version {version}; upgrade lightning-merge"
            )
        fisher_state = state_dict.get("fisher", state_dict)  # version 1 kept the counts at the top level
        counts = dict(fisher_state.get("counts", {}))
        if self._module_names is not None:
            gone = sorted(set(counts) - self._module_names)
            if gone:
                raise StatisticsError(
                    f"resuming from '{self._resume_path}': its captured statistics are for parameters the module no "
                    f"longer has ({', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}); the parameter names "
                    "changed since the checkpoint was saved. Rename them back, or start a fresh fit"
                )
        self._batch_fisher.load_state_dict(fisher_state)
        self._fingerprint = dict(state_dict.get("fingerprint", {}))
        self._restarted_at = state_dict.get("restarted_at")
        fisher = bool(self._batch_fisher.counts and self.fisher)
        gram = self.gram == "train" and bool(state_dict.get("gram"))
        if fisher or gram:  # one read of the checkpoint's sidecar for every accumulator it holds
            stats, problem = self._resume_sidecar(state_dict.get("token"))
            if fisher:
                self._restore_accumulators(stats, problem)
            if gram:
                self._restore_grams(stats, problem)

    def _resume_sidecar(self, token: str | None) -> tuple[Statistics | None, str | None]:
        """The sidecar of the checkpoint resumed from, or why it cannot give the accumulators back."""
        path = find_sidecar(self._resume_path) if self._resume_path else None
        if path is None:
            return None, "it has no statistics sidecar"
        stats = Statistics.load(path)
        if stats.metadata.get("resume_token") != token:
            return None, f"its sidecar '{path}' was written for another save (token mismatch)"
        return stats, None

    @staticmethod
    def _accumulators(stats: Statistics, kind: str, names: Iterable[str],
                      params: Mapping[str, Tensor] | None = None) -> tuple[dict[str, Tensor], str | None]:
        """The float32 accumulators of ``kind`` for ``names`` (the ``resume/`` copy when the statistic itself was
        stored lossy), or the name of the first one missing; with ``params``, each one as its parameter is sharded
        (this rank's part, taken one tensor at a time)."""
        keys = set(stats.keys())
        out = {}
        for name in names:
            key = next((k for k in (f"{RESUME_PREFIX}{kind}/{name}", f"{kind}/{name}") if k in keys), None)
            if key is None:
                return out, f"its sidecar '{stats.origin}' has no float32 accumulator for '{name}'"
            out[name] = stats._tensors[key].to(torch.float32).clone()
            if params is not None:
                out[name] = shard_like(out[name], params[name]).clone()
        return out, None

    def _restore_grams(self, stats: Statistics | None, problem: str | None) -> None:
        """The training-time Σ xxᵀ of the checkpoint resumed from, so the resumed run continues the sums; without
        them the Gram matrices restart, with a warning."""
        sums: dict[str, Tensor] = {}
        rows: dict[str, int] = {}
        if stats is not None:
            count = stats.kinds.get(GRAM, {}).get("count")
            rows = {n: int(c) for n, c in count.items()} if isinstance(count, dict) else {}
            sums, problem = self._accumulators(stats, GRAM, rows)
        if problem is not None:
            rank_zero_warn(f"CurvatureCapture: resuming from '{self._resume_path}', but {problem}: the input Gram "
                           "matrices restart from this step")
            sums, rows = {}, {}
        self._gram_restored = (sums, rows)

    def _restore_accumulators(self, stats: Statistics | None, problem: str | None) -> None:
        """The batch Fisher's float32 accumulators of the checkpoint resumed from; without them it restarts, with a
        warning and ``restarted_at`` in the metadata."""
        if stats is not None:
            meta = stats.kinds.get("fisher.batch", {})
            legacy = float(meta.get("batch_size", 1.0)) if "scale" not in meta else 1.0  # version-1 sidecars
            module = self._trainer.lightning_module if self._trainer is not None else None
            params = dict(module.named_parameters()) if module is not None and sharded_module(module) else None
            values, problem = self._accumulators(stats, "fisher.batch", self._batch_fisher.counts, params)
            if problem is None:
                for name, value in values.items():
                    self._batch_fisher.acc[name] = value * legacy if legacy != 1.0 else value
        if problem is not None:
            rank_zero_warn(
                f"CurvatureCapture: resuming from '{self._resume_path}', but {problem}: the batch-empirical Fisher "
                f"restarts at step {self._batch_fisher.steps} (recorded in the metadata as restarted_at)"
            )
            self._restarted_at = self._batch_fisher.steps
            self._batch_fisher.restart()

    # -- hooks ---------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage == "fit" and self.checkpoint_sidecars:
            io = trainer.strategy.checkpoint_io
            if not isinstance(io, SidecarCheckpointIO):
                trainer.strategy.checkpoint_io = SidecarCheckpointIO(io, self)
            else:
                io.owner = self

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._resume_path = str(trainer.ckpt_path) if trainer.ckpt_path else None
        self._module_names = {n for n, _ in pl_module.named_parameters()}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sharded = sharded_module(pl_module)
        refusal = sharded_refusal(type(trainer.strategy).__name__, self._sharded, fisher=self.fisher,
                                  fisher_after_fit=self.fisher_after_fit, gram=self.gram, peft=holds_peft(pl_module))
        if refusal is not None:
            raise ValueError(refusal)
        if self._sharded and self.checkpoint_sidecars:  # every rank takes part in gathering a sidecar
            wrap_save(trainer.strategy, lambda checkpoint, path: self.after_save(checkpoint, path, collective=True))
        self._names = {id(p): n for n, p in pl_module.named_parameters()}
        self._peft, self._adapter_keys = _find_adapter(pl_module, self.adapter)
        if self.save_final == "adapter" and self._peft is None:
            raise ValueError("CurvatureCapture(save_final='adapter'): the module holds no PEFT model (peft.PeftModel)")
        self._post = {}
        self._gram_totals = None
        self._left_out = set()
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
        if not self._fingerprint and trainer.ckpt_path is None:  # a fresh fit: the base it starts from
            self._fingerprint = fingerprints(pl_module.named_parameters())  # sharded: gathered one at a time
        self._final = None

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

        weight, sequences, tokens = self._batch_fisher.step_weight(
            counts, trainer.world_size, trainer.accumulate_grad_batches, reduce
        )
        named: list[tuple[str, Tensor]] = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) in self._names:
                    named.append((self._names[id(p)], local(p.grad)))  # FSDP2: the local shard of g
        if weight <= 0 or not named:
            return
        agree = (lambda finite: all_ranks(finite, named[0][1].device)) if self._sharded else None
        if self._batch_fisher.step(named, weight, sequences, tokens, agree):
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
        full = self.save_final == "full" or (self.save_final is True and self._peft is None)
        state = trainer.strategy.lightning_module_state_dict() if full else None  # all ranks (FSDP)
        self._final = None

        adapter = self._adapter_snapshot() if self.save_final in (True, "adapter") else None
        if self._sharded:
            self._sidecars.flush()
            if self.save_final:  # the module's own DTensors, on their devices (gathered there)
                self._write_final_sharded(trainer, pl_module.state_dict())
            return

        def write_final() -> None:
            self._sidecars.flush()
            if not self.save_final:
                return
            root = self._final_dir(trainer)
            directory: Any = root if is_url(root) else Path(root)
            statistics, kinds, _ = self._collect(trainer, None, resume=False)
            if adapter is not None:
                folder = join(root, "final.adapter") if is_url(root) else directory / "final.adapter"
                self._write_adapter(folder, adapter, statistics, kinds, self._metadata(trainer))
                rank_zero_info(f"CurvatureCapture: wrote the adapter {folder} with its statistics")
                return
            weights = join(root, "final.safetensors") if is_url(root) else directory / "final.safetensors"
            _save_weights(state, weights)
            write_statistics(
                sidecar_path(weights), statistics, kinds, compression=self.compression, metadata=self._metadata(trainer)
            )
            rank_zero_info(f"CurvatureCapture: wrote {weights} and its statistics")

        # Every rank leaves together, or every rank raises: none tears down while rank 0 still writes.
        on_rank_zero(trainer, write_final, "CurvatureCapture: writing final.safetensors")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._sidecars.flush()
        if self._grams is not None:
            self._grams.detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._sidecars.flush()

    def _write_final_sharded(self, trainer: pl.Trainer, state: Mapping[str, Tensor] | None) -> None:
        """final.safetensors and its statistics of a sharded module, gathered tensor by tensor (every rank)."""
        from lightning_merge.files.ownership import marked

        directory = Path(self._final_dir(trainer))
        weights = directory / "final.safetensors"
        writer = trainer.is_global_zero
        share = trainer.strategy.broadcast
        write_gathered(weights if writer else None, weights_items(state or {}),
                       marked({"format": "pt"}, {"library": "lightning-merge", "output": "weights"}), share=share)
        statistics, kinds, _ = self._collect(trainer, None, resume=False)
        write_statistics_gathered(sidecar_path(weights) if writer else None, statistics, kinds,
                                  compression=self.compression, metadata=self._metadata(trainer), share=share)
        rank_zero_info(f"CurvatureCapture: wrote {weights} and its statistics")

    # -- after fit -----------------------------------------------------------------------------------------------
    def _ensure_post_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute the post-fit Fisher and Gram matrices once per fit (every rank must call this: it reduces across
        ranks). The passes leave the process's random state as they found it (a shuffling loader draws from it), so
        turning a statistic on changes no later random draw of the user's program."""
        devices = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self._post_fit_passes(trainer, pl_module)

    def _post_fit_passes(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A pass that cannot run (no such loader, no example in it) is left out with a warning: the rest of the
        capture (the trained weights, second moments, batch Fisher) is still written."""
        if self.fisher_after_fit is not None and self.fisher_after_fit not in self._post:
            try:
                values, count = post_fit_fisher(
                    trainer, pl_module, estimator=self.fisher_after_fit, loader=self.fisher_loader,
                    examples=self.fisher_examples, samples=self.fisher_samples, seed=self.seed,
                )
            except MissingLoader as err:
                values, count = {}, 0
                rank_zero_warn(f"{err}; the post-fit Fisher is left out of the statistics")
            else:
                if count == 0:
                    rank_zero_warn(f"CurvatureCapture(fisher_after_fit={self.fisher_after_fit!r}): the "
                                   f"{self._loader_name()} gave no example; the post-fit Fisher is left out of the "
                                   "statistics")
            self._post[self.fisher_after_fit] = (values, count)
            self._final = None
        if self.gram == "after_fit" and self._gram_totals is None:
            try:
                self._gram_totals = post_fit_grams(trainer, pl_module, loader=self.fisher_loader,
                                                   examples=self.fisher_examples)
            except MissingLoader as err:
                rank_zero_warn(f"{err}; the Gram matrices are left out of the statistics")
                self._gram_totals = ({}, {}, 0)
            if self._gram_totals[0] and not self._gram_totals[2]:
                rank_zero_warn(f"CurvatureCapture(gram='after_fit'): the {self._loader_name()} gave no example; the "
                               "Gram matrices are left out of the statistics")
                self._gram_totals = ({}, {}, 0)
            self._final = None

    def _loader_name(self) -> str:
        return f"'{self.fisher_loader}' dataloader" if isinstance(self.fisher_loader, str) else "fisher_loader"

    def _total_grams(self, trainer: pl.Trainer) -> None:
        """The training-time Σ xxᵀ over every rank and the restored checkpoint (every rank must call it)."""
        assert self._grams is not None
        sums, rows, _ = reduce_grams(trainer, self._grams.modules, self._grams.sums, self._grams.rows)
        restored_sums, restored_rows = self._gram_restored
        for name, value in restored_sums.items():
            if name in sums:
                sums[name] += value
                rows[name] += restored_rows.get(name, 0)
        self._gram_totals = (sums, rows, 0)
        self._final = None

    def _gram_statistics(self, trainer: pl.Trainer) -> tuple[dict[str, Tensor], dict[str, int], int] | None:
        """The Gram sums to store now: the post-fit pass, or the training-time sums (one process: current; under
        DDP: as of the last all-rank reduction, at the last checkpoint or the fit's end)."""
        if self.gram == "train" and self._grams is not None and trainer.world_size == 1:
            self._total_grams(trainer)
        return self._gram_totals

    # -- collection -----------------------------------------------------------------------------------------------
    def _collect(
        self, trainer: pl.Trainer, optimizer_states: list[dict] | None, resume: bool, copy: bool = True
    ) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, Any]], dict[str, dict[str, Tensor]]]:
        """A CPU float32 copy of everything to store: ``(statistics, kinds, resume accumulators)``."""
        statistics: dict[str, dict[str, Tensor]] = {}
        kinds: dict[str, dict[str, Any]] = {}
        resume_acc: dict[str, dict[str, Tensor]] = {}
        if self.second_moments:
            fsdp = "fsdp" in type(trainer.strategy).__name__.lower()
            index_names = [n for n, _ in trainer.lightning_module.named_parameters()] if fsdp else None
            moments, meta = read_second_moments(
                trainer.optimizers, self._names, optimizer_states=optimizer_states, index_names=index_names, copy=copy
            )
            self._warn_unstepped(meta.get("unstepped", []))
            if moments:
                statistics["exp_avg_sq"], kinds["exp_avg_sq"] = moments, meta
        if self.fisher and self._batch_fisher.acc:
            params = dict(trainer.lightning_module.named_parameters()) if self._sharded else {}
            values = {n: like(t, params[n]) if self._sharded else cpu_float(t, copy)  # shards laid out as params
                      for n, t in self._batch_fisher.acc.items()}
            statistics["fisher.batch"] = values
            kinds["fisher.batch"] = {
                **self._batch_fisher.metadata(),
                "loss_reduction": self.loss_reduction,
                "start_step": self.fisher_start_step,
                "every_n_steps": self.fisher_every_n_steps,
                "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "world_size": trainer.world_size,
                "precision": str(trainer.precision),
                "restarted_at": self._restarted_at,
            }
            if resume and self.compression != "float32":
                resume_acc["fisher.batch"] = values
        grams = self._gram_statistics(trainer) if self.gram is not None else None
        if grams is not None:
            sums, rows, examples = grams
            unseen = sorted(n for n in sums if rows.get(n, 0) <= 0)
            self._warn_left_out(unseen)
            sums = {n: s for n, s in sums.items() if rows.get(n, 0) > 0}
        if grams is not None and sums:
            statistics[GRAM] = sums
            kinds[GRAM] = {"count": {n: rows[n] for n in sums}, "form": self.gram_form, "rank": self.gram_rank,
                           "source": self.gram, "examples": examples if self.gram == "after_fit" else None}
            if resume and self.gram_form != "full":
                resume_acc[GRAM] = sums
        for estimator, (values, count) in self._post.items():
            if count <= 0:  # the pass saw no example (warned when it ran)
                continue
            statistics[f"fisher.{estimator}"] = {n: t.detach().to("cpu", torch.float32) for n, t in values.items()}
            kinds[f"fisher.{estimator}"] = {
                "estimator": estimator,
                "count": count,
                "samples": self.fisher_samples if estimator == "true" else None,
                "loader": self.fisher_loader if isinstance(self.fisher_loader, str) else "custom",
                "seed": self.seed,
            }
        return statistics, kinds, resume_acc

    def _warn_unstepped(self, names: list[str]) -> None:
        new = [n for n in names if f"exp_avg_sq/{n}" not in self._left_out]
        if new:
            self._left_out.update(f"exp_avg_sq/{n}" for n in new)
            rank_zero_warn(
                f"CurvatureCapture: the optimizer state of {', '.join(repr(n) for n in new[:5])}"
                f"{' ...' if len(new) > 5 else ''} records step 0 (no update yet), so its second moments cannot be "
                "bias-corrected and are left out of the statistics until it is updated"
            )

    def _warn_left_out(self, names: list[str]) -> None:
        """Warn once per layer whose Gram matrix is left out because it saw no input: a statistic over no rows is no
        statistic (a sidecar holding one would be refused when read, and refused when written)."""
        new = [n for n in names if n not in self._left_out]
        if not new:
            return
        self._left_out.update(new)
        when = ("no training forward reached" if self.gram == "train" else
                f"no forward over the {self._loader_name()} reached")
        rank_zero_warn(
            f"CurvatureCapture(gram={self.gram!r}): {when} {', '.join(repr(n) for n in new[:5])}"
            f"{' ...' if len(new) > 5 else ''}: its forward hook never ran (a layer called as F.linear(x, "
            "layer.weight) or layer.forward(x) bypasses hooks; call layer(x)), so its Gram matrix is left out of the "
            "statistics (RegMean averages a weight no expert has a Gram matrix for)"
        )

    def _metadata(self, trainer: pl.Trainer, token: str | None = None) -> dict[str, str]:
        meta = {
            "base_fingerprint": json.dumps(self._fingerprint, sort_keys=True),
            "global_step": str(trainer.global_step),
            "producer": "lightning_merge.callbacks.CurvatureCapture",
        }
        if token is not None:
            meta["resume_token"] = token
        return meta

    def _final_dir(self, trainer: pl.Trainer) -> str:
        if self.dirpath is not None:
            return self.dirpath
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return str(ckpt.dirpath)
        return trainer.default_root_dir

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
        key = (self._trainer.global_step, self._batch_fisher.steps, tuple(self._post),
               sum(self._grams.rows.values()) if self._grams is not None else 0, self._gram_totals is None)
        if self._final is None or self._final_key != key:
            statistics, kinds, _ = self._collect(self._trainer, None, resume=False)
            tensors = {f"{kind}/{name}": t for kind, per in statistics.items() for name, t in per.items()}
            self._final = Statistics(tensors, {**kinds}, origin="CurvatureCapture.finalize()")
            self._final.metadata = self._metadata(self._trainer)
            self._final_key = key
        return self._final

    def save(self, path: str | os.PathLike, names: Mapping[str, str] | None = None) -> Path:
        """Write the current statistics to a sidecar file ``path`` (atomically).

        Args:
            path: the file to write (``X.statistics.safetensors`` pairs with ``X.ckpt`` / ``X.safetensors``).
            names: optional renaming ``{module parameter name: stored name}``; parameters not in it are left out.
        """
        if self._trainer is None:
            raise RuntimeError("CurvatureCapture.save() needs a fit first")
        if self._sharded:
            raise NotImplementedError(SHARDED_IN_MEMORY.format("save()"))
        statistics, kinds, _ = self._collect(self._trainer, None, resume=False)
        if names is not None:
            statistics = {k: {names[n]: t for n, t in per.items() if n in names} for k, per in statistics.items()}
            kinds = {k: _rename_meta(meta, names) for k, meta in kinds.items()}
        return write_statistics(
            path, statistics, kinds, compression=self.compression, metadata=self._metadata(self._trainer)
        )

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
        from peft import get_peft_model_state_dict

        if self._trainer is None:
            raise RuntimeError("save_adapter_statistics() needs a fit first")
        adapter_state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
        by_storage = {(t.data_ptr(), tuple(t.shape)): key for key, t in adapter_state.items()}
        names = {}
        for name, p in self._trainer.lightning_module.named_parameters():
            key = by_storage.get((p.data_ptr(), tuple(p.shape)))
            if key is not None:
                names[name] = key
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
        if collective != self._sharded:  # a sharded module's sidecars are gathered by every rank (wrap_save)
            return
        state = checkpoint.get("callbacks", {}).get(self.state_key, {})
        token = state.get("token")
        if self._sharded:
            trainer = self._trainer
            assert trainer is not None
            statistics, kinds, resume = self._collect(trainer, None, resume=True, copy=False)
            write_statistics_gathered(checkpoint_sidecar(path) if trainer.is_global_zero else None, statistics, kinds,
                                      compression=self.compression, resume=resume,
                                      metadata=self._metadata(trainer, token), share=trainer.strategy.broadcast)
            return
        snapshot = self._pending.pop(token, None) if token else None
        if snapshot is None:  # a weights-only save: no callback state, take the statistics now
            assert self._trainer is not None
            snapshot = self._collect(self._trainer, None, resume=False, copy=False)
        self._pending.clear()
        if snapshot[0] or self._peft is not None:  # metadata and adapter weights now: the step moves on meanwhile
            self._sidecars.save(path, (*snapshot, self._metadata(self._trainer, token), self._adapter_snapshot(), path))

    def after_remove(self, path: str) -> None:
        self._sidecars.remove(path)
        folder = adapter_path(path)
        if not isinstance(folder, str) or self._peft is not None:
            remove_output(folder)  # the adapter saved beside it, if this capture wrote it

    def _write_sidecar(self, target: Path, snapshot: tuple) -> None:
        statistics, kinds, resume, metadata, adapter, checkpoint = snapshot
        if statistics:
            write_statistics(target, statistics, kinds, compression=self.compression, resume=resume,
                             metadata=metadata)
        if adapter is not None:
            self._write_adapter(adapter_path(checkpoint), adapter, statistics, kinds, metadata)

    # -- PEFT adapters ----------------------------------------------------------------------------------------------
    def _adapter_snapshot(self) -> tuple[dict[str, Tensor], Any] | None:
        """A copy of the adapter's weights (keyed as PEFT saves them) and its config, or None without PEFT."""
        if self._peft is None:
            return None
        from peft import get_peft_model_state_dict

        name = self.adapter or self._peft.active_adapter
        weights = {k: v.detach().to("cpu", copy=True) for k, v in
                   get_peft_model_state_dict(self._peft, adapter_name=name).items()}
        return weights, self._peft.peft_config[name]

    def _write_adapter(self, folder: Path | str, adapter: tuple, statistics: dict, kinds: dict,
                       metadata: dict) -> None:
        """An adapter folder as PEFT writes one, with ``statistics.safetensors`` keyed like its weights; atomic."""
        from lightning_merge.files.atomic import commit, fsync_tree, partial_path
        from lightning_merge.files.outputs import check_output_path
        from lightning_merge.files.ownership import write_record
        from lightning_merge.files.safetensors import save_tensors

        if isinstance(folder, str):  # object storage: written locally, uploaded weights last
            with staged(folder) as local:
                self._write_adapter(local, adapter, statistics, kinds, metadata)
            return
        check_output_path(folder, True, folder=True)  # an earlier adapter of this capture, or nothing

        weights, config = adapter
        keys = self._adapter_keys
        tmp = partial_path(folder)
        tmp.mkdir(parents=True)
        try:
            save_tensors(tmp / "adapter_model.safetensors", weights, {"format": "pt"})
            config.save_pretrained(str(tmp))
            renamed = {k: {keys[n]: t for n, t in per.items() if n in keys} for k, per in statistics.items()}
            renamed = {k: v for k, v in renamed.items() if v}
            if renamed:
                meta = {k: _rename_meta(kinds[k], keys) for k in renamed}
                write_statistics(tmp / "statistics.safetensors", renamed, meta, compression=self.compression,
                                 metadata=metadata)
            write_record(tmp, {"output": "adapter", "checkpoint_metadata": metadata})
            fsync_tree(tmp)
            commit(tmp, folder, replace="own")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def adapter_path(checkpoint: str | os.PathLike) -> Path | str:
    """The adapter folder saved beside a checkpoint of a PEFT model: ``X.ckpt`` → ``X.adapter`` (a URL string
    for a checkpoint in object storage)."""
    if is_url(checkpoint):
        url = str(checkpoint)
        stem = url[: -len(".ckpt")] if url.endswith(".ckpt") else url
        return stem + ".adapter"
    path = Path(checkpoint)
    return path.with_name((path.name[: -len(path.suffix)] if path.suffix else path.name) + ".adapter")


def _find_adapter(module: torch.nn.Module, adapter: str | None) -> tuple[Any, dict[str, str]]:
    """The PEFT model inside ``module`` (None without one) and ``{module parameter name: adapter key}``."""
    if "peft" not in sys.modules:
        return None, {}
    from peft import PeftModel, get_peft_model_state_dict

    peft_model = next((m for m in module.modules() if isinstance(m, PeftModel)), None)
    if peft_model is None:
        if adapter is not None:
            raise ValueError(f"CurvatureCapture(adapter={adapter!r}): the module holds no PEFT model")
        return None, {}
    name = adapter or peft_model.active_adapter
    if name not in peft_model.peft_config:
        raise ValueError(f"CurvatureCapture(adapter={name!r}): the PEFT model has adapters "
                         f"{', '.join(peft_model.peft_config)}")
    by_storage = {(t.data_ptr(), tuple(t.shape)): key
                  for key, t in get_peft_model_state_dict(peft_model, adapter_name=name).items()}
    keys = {n: by_storage[(p.data_ptr(), tuple(p.shape))] for n, p in module.named_parameters()
            if (p.data_ptr(), tuple(p.shape)) in by_storage}
    return peft_model, keys


def _rename_meta(meta: Mapping[str, Any], keys: Mapping[str, str]) -> dict[str, Any]:
    out = dict(meta)
    for key in ("beta2", "step", "count"):
        if isinstance(out.get(key), dict):
            out[key] = {keys[n]: v for n, v in out[key].items() if n in keys}
    return out


def _save_weights(state: Mapping[str, Tensor] | None, path: Path | str, what: str = "weights") -> None:
    """Save a state dict as safetensors atomically (tensors sharing storage, tied weights, become copies), marked as
    an output of lightning-merge: it replaces only an earlier one (see :mod:`lightning_merge.files.ownership`)."""
    from lightning_merge.files.ownership import marked
    from lightning_merge.files.safetensors import save_tensors

    assert state is not None
    save_tensors(path, {key: value.detach().to("cpu") for key, value in state.items()},
                 marked({"format": "pt"}, {"library": "lightning-merge", "output": what}), replace="own")


__all__ = ["CurvatureCapture"]
