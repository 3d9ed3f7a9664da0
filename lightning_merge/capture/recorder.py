"""What a curvature capture has recorded, and what it would store now, without Lightning: the batch Fisher, the
post-fit passes, the Gram totals, the base fingerprint; the statistics to store (:meth:`Recorder.collect`), their
metadata, and the plain state a checkpoint carries (its float32 accumulators travel in the checkpoint's sidecar and
are read back from there on resume). :class:`~lightning_merge.callbacks.CurvatureCapture` feeds it from the
Trainer's hooks."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_merge.capture.config import CaptureConfig
from lightning_merge.capture.fisher_accumulator import BatchFisher
from lightning_merge.capture.post_fit import MissingLoader, post_fit_fisher, post_fit_grams
from lightning_merge.capture.records import Collected, FisherPass, GramTotals
from lightning_merge.capture.second_moments import cpu_float, read_second_moments
from lightning_merge.capture.sharded import like, shard_like
from lightning_merge.capture.sharding import is_dtensor
from lightning_merge.formats.sidecar import GRAM, RESUME_PREFIX, Statistics, StatisticsError, find_sidecar

STATE_VERSION = 2


class Recorder:
    """The recorded statistics of one capture, across fits and resumes.

    Args:
        config: the capture's settings.
        warn: how to warn (the callback passes Lightning's ``rank_zero_warn``: once, on rank 0).

    Attributes:
        batch_fisher: the batch-empirical Fisher accumulator.
        fingerprint: ``{parameter name: fingerprint}`` of the base the first fit started from.
        restarted_at: the step the batch Fisher restarted at after a resume that lost it (None: never).
        post: the post-fit Fisher passes of this fit, by estimator.
        gram_restored: the training-time Gram totals of the checkpoint resumed from.
        gram_totals: the Gram totals to store (None: not computed yet in this fit).
        left_out: what was warned about as left out of the statistics in this fit.
    """

    def __init__(self, config: CaptureConfig, warn: Callable[[str], Any]):
        self.config = config
        self.warn = warn
        self.batch_fisher = BatchFisher(config.fisher_ema_decay)
        self.fingerprint: dict[str, str] = {}
        self.restarted_at: int | None = None
        self.post: dict[str, FisherPass] = {}
        self.gram_restored = GramTotals()
        self.gram_totals: GramTotals | None = None
        self.left_out: set[str] = set()

    def new_fit(self) -> None:
        """Forget the previous fit's post-fit passes, Gram totals and warnings."""
        self.post = {}
        self.gram_totals = None
        self.left_out = set()

    # -- checkpoint state ---------------------------------------------------------------------------------------------
    def state_dict(self, token: str) -> dict[str, Any]:
        """Plain values (counts, ``token`` that pairs a checkpoint with its sidecar, the base fingerprint)."""
        return {
            "version": STATE_VERSION,
            "token": token,
            "fisher": self.batch_fisher.state_dict(),
            "fingerprint": dict(self.fingerprint),
            "restarted_at": self.restarted_at,
            "gram": self.config.gram == "train",
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], resume_path: str | None,
                        module_names: set[str] | None, shard_as: Mapping[str, Tensor] | None = None) -> None:
        """Restore the state of a checkpoint, and the float32 accumulators from its sidecar.

        Args:
            state_dict: what :meth:`state_dict` returned when the checkpoint was saved.
            resume_path: the checkpoint resumed from (its sidecar holds the accumulators).
            module_names: the parameter names of the module now (None: unknown); statistics for parameters it no
                longer has are refused.
            shard_as: ``{name: parameter}`` of a sharded module (``DTensor`` parameters: FSDP2): each accumulator
                read back keeps this rank's part, split as its parameter is (one tensor at a time); None: whole.

        Raises:
            StatisticsError: the state is from a newer lightning-merge, or names parameters the module lacks.
        """
        version = state_dict.get("version", 0)
        if version > STATE_VERSION:
            raise StatisticsError(
                f"the checkpoint's CurvatureCapture state has version {version}; upgrade lightning-merge"
            )
        fisher_state = state_dict.get("fisher", state_dict)  # version 1 kept the counts at the top level
        counts = dict(fisher_state.get("counts", {}))
        if module_names is not None:
            gone = sorted(set(counts) - module_names)
            if gone:
                raise StatisticsError(
                    f"resuming from '{resume_path}': its captured statistics are for parameters the module no "
                    f"longer has ({', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}); the parameter names "
                    "changed since the checkpoint was saved. Rename them back, or start a fresh fit"
                )
        self.batch_fisher.load_state_dict(fisher_state)
        self.fingerprint = dict(state_dict.get("fingerprint", {}))
        self.restarted_at = state_dict.get("restarted_at")
        fisher = bool(self.batch_fisher.counts and self.config.fisher)
        gram = self.config.gram == "train" and bool(state_dict.get("gram"))
        if fisher or gram:  # one read of the checkpoint's sidecar for every accumulator it holds
            stats, problem = _resume_sidecar(resume_path, state_dict.get("token"))
            if fisher:
                self._restore_batch_fisher(stats, problem, resume_path, shard_as)
            if gram:
                self._restore_grams(stats, problem, resume_path)

    def _restore_grams(self, stats: Statistics | None, problem: str | None, resume_path: str | None) -> None:
        """The training-time Σ xxᵀ of the checkpoint resumed from, so the resumed run continues the sums; without
        them the Gram matrices restart, with a warning."""
        sums: dict[str, Tensor] = {}
        rows: dict[str, int] = {}
        if stats is not None:
            count = stats.kinds.get(GRAM, {}).get("count")
            rows = {n: int(c) for n, c in count.items()} if isinstance(count, dict) else {}
            sums, problem = _accumulators(stats, GRAM, rows)
        if problem is not None:
            self.warn(f"CurvatureCapture: resuming from '{resume_path}', but {problem}: the input Gram "
                      "matrices restart from this step")
            sums, rows = {}, {}
        self.gram_restored = GramTotals(sums, rows)

    def _restore_batch_fisher(self, stats: Statistics | None, problem: str | None, resume_path: str | None,
                              shard_as: Mapping[str, Tensor] | None = None) -> None:
        """The batch Fisher's float32 accumulators of the checkpoint resumed from; without them it restarts, with a
        warning and ``restarted_at`` in the metadata."""
        if stats is not None:
            meta = stats.kinds.get("fisher.batch", {})
            legacy = float(meta.get("batch_size", 1.0)) if "scale" not in meta else 1.0  # version-1 sidecars
            values, problem = _accumulators(stats, "fisher.batch", self.batch_fisher.counts, shard_as)
            if problem is None:
                for name, value in values.items():
                    self.batch_fisher.acc[name] = value * legacy if legacy != 1.0 else value
        if problem is not None:
            self.warn(
                f"CurvatureCapture: resuming from '{resume_path}', but {problem}: the batch-empirical Fisher "
                f"restarts at step {self.batch_fisher.steps} (recorded in the metadata as restarted_at)"
            )
            self.restarted_at = self.batch_fisher.steps
            self.batch_fisher.restart()

    # -- after fit ----------------------------------------------------------------------------------------------------
    def post_fit(self, trainer: Any, module: Any) -> bool:
        """Run the post-fit Fisher and Gram passes that have not run in this fit; whether one ran.

        Every rank must call it (the passes reduce across ranks). A pass that cannot run (no such loader, no example
        in it) is left out with a warning: the rest of the capture (the trained weights, second moments, batch
        Fisher) is still written. The passes leave the process's random state as they found it (a shuffling loader
        draws from it), so turning a statistic on changes no later random draw of the user's program.

        Args:
            trainer: the Lightning Trainer (its loaders, ranks and reductions).
            module: the trained module.
        """
        devices = [module.device.index or 0] if module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._post_fit_passes(trainer, module)

    def _post_fit_passes(self, trainer: Any, module: Any) -> bool:
        config, ran = self.config, False
        if config.fisher_after_fit is not None and config.fisher_after_fit not in self.post:
            try:
                result = post_fit_fisher(
                    trainer, module, estimator=config.fisher_after_fit, loader=config.fisher_loader,
                    examples=config.fisher_examples, samples=config.fisher_samples, seed=config.seed,
                )
            except MissingLoader as err:
                result = FisherPass()
                self.warn(f"{err}; the post-fit Fisher is left out of the statistics")
            else:
                if result.count == 0:
                    self.warn(f"CurvatureCapture(fisher_after_fit={config.fisher_after_fit!r}): the "
                              f"{config.loader_name} gave no example; the post-fit Fisher is left out of the "
                              "statistics")
            self.post[config.fisher_after_fit] = result
            ran = True
        if config.gram == "after_fit" and self.gram_totals is None:
            try:
                self.gram_totals = post_fit_grams(trainer, module, loader=config.fisher_loader,
                                                  examples=config.fisher_examples)
            except MissingLoader as err:
                self.warn(f"{err}; the Gram matrices are left out of the statistics")
                self.gram_totals = GramTotals()
            if self.gram_totals.sums and not self.gram_totals.examples:
                self.warn(f"CurvatureCapture(gram='after_fit'): the {config.loader_name} gave no example; the "
                          "Gram matrices are left out of the statistics")
                self.gram_totals = GramTotals()
            ran = True
        return ran

    # -- Gram matrices ------------------------------------------------------------------------------------------------
    def total_grams(self, reduced: GramTotals) -> GramTotals:
        """The training-time totals: ``reduced`` (this fit's sums over every rank) plus the restored checkpoint's;
        kept as :attr:`gram_totals`."""
        sums, rows = reduced.sums, reduced.rows
        for name, value in self.gram_restored.sums.items():
            if name in sums:
                sums[name] += value
                rows[name] += self.gram_restored.rows.get(name, 0)
        self.gram_totals = GramTotals(sums, rows)
        return self.gram_totals

    # -- what to store ------------------------------------------------------------------------------------------------
    def collect(self, optimizers: Sequence[Any], names_by_id: Mapping[int, str], run: Mapping[str, Any], *,
                optimizer_states: list[dict] | None = None, index_names: Sequence[str] | None = None,
                resume: bool = False, copy: bool = True, shard_as: Mapping[str, Tensor] | None = None) -> Collected:
        """A CPU float32 copy of everything to store (a sharded module's: ``DTensor`` shards, on their devices, that
        :func:`~lightning_merge.capture.sharded.write_statistics_gathered` gathers one at a time).

        Args:
            optimizers: the optimizers (their second moments).
            names_by_id: ``id(parameter) -> name`` of the module's parameters.
            run: the training settings the batch Fisher's metadata records: ``accumulate_grad_batches``,
                ``world_size`` and ``precision``.
            optimizer_states: the optimizers' state dicts as saved in a checkpoint (None: read them now).
            index_names: parameter names in optimizer-state index order (FSDP1's gathered state), or None.
            resume: also keep float32 accumulators of the statistics stored lossy (checkpoint sidecars).
            copy: copy the tensors (False: views of the live ones where possible, for a write that the next
                optimizer step waits for).
            shard_as: ``{name: parameter}`` of a sharded module: the batch Fisher's accumulators (this rank's
                shards) are returned as ``DTensor`` shards laid out as their parameters; None: not sharded.
        """
        config, out = self.config, Collected()
        if config.second_moments:
            moments, meta = read_second_moments(
                optimizers, names_by_id, optimizer_states=optimizer_states, index_names=index_names, copy=copy
            )
            self._warn_unstepped(meta.get("unstepped", []))
            if moments:
                out.statistics["exp_avg_sq"], out.kinds["exp_avg_sq"] = moments, meta
        if config.fisher and self.batch_fisher.acc:
            values = {n: like(t, shard_as[n]) if shard_as is not None else cpu_float(t, copy)
                      for n, t in self.batch_fisher.acc.items()}
            out.statistics["fisher.batch"] = values
            out.kinds["fisher.batch"] = {
                **self.batch_fisher.metadata(),
                "loss_reduction": config.loss_reduction,
                "start_step": config.fisher_start_step,
                "every_n_steps": config.fisher_every_n_steps,
                "accumulate_grad_batches": run["accumulate_grad_batches"],
                "world_size": run["world_size"],
                "precision": str(run["precision"]),
                "restarted_at": self.restarted_at,
            }
            if resume and config.compression != "float32":
                out.resume["fisher.batch"] = values
        grams = self.gram_totals if config.gram is not None else None
        if grams is not None:
            self._warn_left_out(sorted(n for n in grams.sums if grams.rows.get(n, 0) <= 0))
            sums = {n: s for n, s in grams.sums.items() if grams.rows.get(n, 0) > 0}
            if sums:
                out.statistics[GRAM] = sums
                out.kinds[GRAM] = {"count": {n: grams.rows[n] for n in sums}, "form": config.gram_form,
                                   "rank": config.gram_rank, "source": config.gram,
                                   "examples": grams.examples if config.gram == "after_fit" else None}
                if resume and config.gram_form != "full":
                    out.resume[GRAM] = sums
        for estimator, result in self.post.items():
            if result.count <= 0:  # the pass saw no example (warned when it ran)
                continue
            out.statistics[f"fisher.{estimator}"] = {  # a sharded module's: float32 shards, gathered when written
                n: t.detach() if is_dtensor(t) else t.detach().to("cpu", torch.float32)
                for n, t in result.values.items()}
            out.kinds[f"fisher.{estimator}"] = {
                "estimator": estimator,
                "count": result.count,
                "samples": config.fisher_samples if estimator == "true" else None,
                "loader": config.loader_label,
                "seed": config.seed,
            }
        return out

    def metadata(self, global_step: int, token: str | None = None) -> dict[str, str]:
        """The file metadata of a statistics file written at ``global_step`` (``token``: a checkpoint sidecar's)."""
        meta = {
            "base_fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "global_step": str(global_step),
            "producer": "lightning_merge.callbacks.CurvatureCapture",
        }
        if token is not None:
            meta["resume_token"] = token
        return meta

    def _warn_unstepped(self, names: list[str]) -> None:
        new = [n for n in names if f"exp_avg_sq/{n}" not in self.left_out]
        if new:
            self.left_out.update(f"exp_avg_sq/{n}" for n in new)
            self.warn(
                f"CurvatureCapture: the optimizer state of {', '.join(repr(n) for n in new[:5])}"
                f"{' ...' if len(new) > 5 else ''} records step 0 (no update yet), so its second moments cannot be "
                "bias-corrected and are left out of the statistics until it is updated"
            )

    def _warn_left_out(self, names: list[str]) -> None:
        """Warn once per layer whose Gram matrix is left out because it saw no input: a statistic over no rows is no
        statistic (a sidecar holding one would be refused when read, and refused when written)."""
        new = [n for n in names if n not in self.left_out]
        if not new:
            return
        self.left_out.update(new)
        when = ("no training forward reached" if self.config.gram == "train" else
                f"no forward over the {self.config.loader_name} reached")
        self.warn(
            f"CurvatureCapture(gram={self.config.gram!r}): {when} {', '.join(repr(n) for n in new[:5])}"
            f"{' ...' if len(new) > 5 else ''}: its forward hook never ran (a layer called as F.linear(x, "
            "layer.weight) or layer.forward(x) bypasses hooks; call layer(x)), so its Gram matrix is left out of the "
            "statistics (RegMean averages a weight no expert has a Gram matrix for)"
        )


def _resume_sidecar(resume_path: str | None, token: str | None) -> tuple[Statistics | None, str | None]:
    """The sidecar of the checkpoint resumed from, or why it cannot give the accumulators back."""
    path = find_sidecar(resume_path) if resume_path else None
    if path is None:
        return None, "it has no statistics sidecar"
    stats = Statistics.load(path)
    if stats.metadata.get("resume_token") != token:
        return None, f"its sidecar '{path}' was written for another save (token mismatch)"
    return stats, None


def _accumulators(stats: Statistics, kind: str, names: Iterable[str], shard_as: Mapping[str, Tensor] | None = None,
                  ) -> tuple[dict[str, Tensor], str | None]:
    """The float32 accumulators of ``kind`` for ``names`` (the ``resume/`` copy when the statistic itself was stored
    lossy), or the name of the first one missing; with ``shard_as``, each one as its parameter is sharded (this
    rank's part, taken one tensor at a time)."""
    keys = set(stats.keys())
    out = {}
    for name in names:
        key = next((k for k in (f"{RESUME_PREFIX}{kind}/{name}", f"{kind}/{name}") if k in keys), None)
        if key is None:
            return out, f"its sidecar '{stats.origin}' has no float32 accumulator for '{name}'"
        out[name] = stats._tensors[key].to(torch.float32).clone()
        if shard_as is not None:
            out[name] = shard_like(out[name], shard_as[name]).clone()
    return out, None


__all__ = ["STATE_VERSION", "Recorder"]
