"""``ContinualMerge``: fold the model just trained into a continual-merge state when its fit ends."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_merge.callbacks._distributed import on_rank_zero
from lightning_merge.callbacks._trained import holds_shards, load_weights, module_state, write_weights
from lightning_merge.strategies.base import Strategy


class ContinualMerge(Callback):
    """Fold the trained model into a :class:`~lightning_merge.ContinualState` when ``trainer.fit`` ends.

    Example::

        trainer = Trainer(callbacks=[
            CurvatureCapture(),                                  # statistics for Fisher / OTA
            ContinualMerge(state="merged-state", base="base.safetensors", strategy=OPCM(alpha=0.5)),
        ])
        trainer.fit(model, dm)        # the state now includes this run; merged model in merged-state/current/model

    The state is created on first use (with ``base`` and ``strategy``); later runs may pass only ``state``. The
    trained model is read from memory (``state_dict`` names, so ``base`` must use the same names, for example a
    ``final.safetensors`` or ``.ckpt`` of the same LightningModule), with the statistics of a ``CurvatureCapture``
    in the same Trainer where the strategy uses them. Rank 0 adds; the other ranks wait. Concurrent runs on other
    machines sharing the folder take turns through the state's lock.

    Args:
        state: the state folder.
        base: the base model (needed to create the state).
        strategy: the strategy (needed to create the state): OPCM, DOP, Linear, TaskArithmetic, Fisher, OTA.
        name: the journal's name for this run (default: the Trainer's ``default_root_dir`` name).
        allow_duplicate: fold in a model whose weights are already in the journal.
        load_merged: load the state's merged model into the module when done.
        on_missing: what to do with a module whose tensors are not exactly the base's (``ContinualState.create``'s
            ``on_missing``): ``"error"`` refuses it before training, naming the tensor; ``"base"`` leaves tensors
            the base lacks (a new head) out of the merge. Default: the existing state's policy, ``"error"`` for a
            new state.
    """

    def __init__(
        self,
        state: str,
        base: str | None = None,
        strategy: Strategy | Mapping[str, Any] | None = None,
        name: str | None = None,
        allow_duplicate: bool = False,
        load_merged: bool = False,
        on_missing: str | None = None,
    ) -> None:
        super().__init__()
        from lightning_merge.continual.layout import ON_MISSING

        if on_missing is not None and on_missing not in ON_MISSING:
            raise ValueError(f"ContinualMerge: on_missing must be one of {', '.join(ON_MISSING)}, got {on_missing!r}")
        self.on_missing = on_missing
        self.state = state
        self.base = base
        self.strategy = strategy if strategy is None or isinstance(strategy, Strategy) else Strategy.from_dict(strategy)
        self.name = name
        self.allow_duplicate = allow_duplicate
        self.load_merged = load_merged
        self.entry: dict[str, Any] | None = None
        if self.strategy is not None:
            from lightning_merge.strategies.base import NoContinualForm

            try:
                self.strategy.continual_form()
            except NoContinualForm as err:
                raise ValueError(f"ContinualMerge: {err}") from None

    def _run_name(self, trainer: pl.Trainer) -> str:
        return self.name or Path(trainer.default_root_dir).name

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check before training what would make the fold fail after it: the state, the base, the statistics."""
        if stage != "fit":
            return

        from lightning_merge.callbacks._checks import after_weight_averaging, check_experts_match, check_statistics
        from lightning_merge.continual.state import ContinualState
        from lightning_merge.files.remote import exists, join
        from lightning_merge.sources.expert import Expert

        who = "ContinualMerge"
        after_weight_averaging(trainer, self)  # SWA / EMA put their average in the module first: that is folded in
        if exists(join(str(self.state), "state.json")):
            state = ContinualState(self.state)
            strategy = state.strategy
            if self.strategy is not None and self.strategy.to_dict() != strategy.to_dict():
                raise ValueError(f"{who}: '{self.state}' merges with {strategy!r}, not {self.strategy!r}")
            name = self._run_name(trainer)
            if not self.allow_duplicate and any(e["name"] == name for e in state.journal):
                raise ValueError(
                    f"{who}: a run named '{name}' is already in '{self.state}'; this fit would fold a second copy. "
                    "Pass name= a new name, or allow_duplicate=True"
                )
            base = Expert(state.config["base"])
            on_missing = state.on_missing
            if self.on_missing is not None and self.on_missing != on_missing:
                raise ValueError(f"{who}: '{self.state}' was created with on_missing={on_missing!r}, not "
                                 f"{self.on_missing!r}")
        else:
            if self.base is None or self.strategy is None:
                raise ValueError(f"{who}: '{self.state}' does not exist yet; pass base= and strategy= to create it")
            strategy = self.strategy
            base = Expert(self.base)
            on_missing = self.on_missing or "error"
        module_state = pl_module.state_dict()
        extra = [n for n in module_state if n not in base]
        if extra and on_missing == "error":
            raise ValueError(
                f"{who}: the module has tensor '{extra[0]}' ({len(extra)} such) that the base '{base.name}' lacks; a "
                "continual state merges the base's tensors: pass on_missing='base' to leave such tensors out of the "
                "merge, or save a base with them"
            )
        missing = [n for n in base.names() if base.spec(n).is_floating and n not in module_state]
        if missing and on_missing == "error":
            raise ValueError(
                f"{who}: the module has no tensor '{missing[0]}' of the base '{base.name}' ({len(missing)} missing); "
                "the base must be a final.safetensors or .ckpt of this LightningModule (its state_dict names)"
            )
        floating = {n: v for n, v in module_state.items() if n in base}
        check_experts_match(who, [base], floating)
        check_statistics(who, strategy, [], trainer, "error")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_merge.callbacks.capture import CurvatureCapture
        from lightning_merge.continual.state import ContinualState
        from lightning_merge.sources.expert import Expert

        capture = next((c for c in trainer.callbacks if isinstance(c, CurvatureCapture)), None)
        weights = module_state(trainer, pl_module)  # every rank
        run_name = self.name or Path(trainer.default_root_dir).name
        written: list[str] = []  # this fold's own files, removed once it is done
        if holds_shards(weights):
            # A sharded (FSDP2) module: the run and its statistics are gathered tensor by tensor into files that
            # rank 0 folds in lazily; no rank holds the whole model.
            from lightning_merge.files.remote import join

            path = join(trainer.default_root_dir, "continual_trained.safetensors")
            write_weights(trainer, weights, path, "ContinualMerge trained weights")
            written.append(path)
            statistics: Any = None
            if capture is not None:
                from lightning_merge.formats.sidecar import sidecar_path

                statistics = str(sidecar_path(path))
                capture.save(statistics)
                written.append(statistics)

            def expert() -> Expert:
                return Expert(path, statistics=statistics, name=run_name)
        else:
            statistics = capture.finalize(after_fit=True) if capture is not None else None  # every rank

            def expert() -> Expert:
                return Expert({k: v.detach().cpu() for k, v in weights.items()}, statistics=statistics,
                              name=run_name)

        def fold() -> None:
            try:
                _fold()
            finally:
                from lightning_merge.files.outputs import remove_output

                for file in written:
                    remove_output(file)

        def _fold() -> None:
            from lightning_merge.files.remote import exists, join

            if exists(join(str(self.state), "state.json")):
                state = ContinualState(self.state)
            else:
                if self.base is None or self.strategy is None:
                    raise ValueError(
                        f"ContinualMerge: '{self.state}' does not exist yet; pass base= and strategy= to create it"
                    )
                state = ContinualState.create(self.state, base=self.base, strategy=self.strategy, exist_ok=True,
                                              on_missing=self.on_missing or "error")
            self.entry = state.add(expert(), allow_duplicate=self.allow_duplicate)
            rank_zero_info(f"ContinualMerge: folded this run into {self.state} as expert {self.entry['order']}")
            if trainer.loggers:
                from lightning_merge.callbacks._logging import bars, log_to_loggers

                info = state.describe()
                norms = {e["name"]: e["task_vector_norm"] for e in info["journal"]}
                metrics = {"count": info["count"], "task_vector_norm": info["journal"][-1]["task_vector_norm"],
                           "mean_task_vector_norm": info["mean_task_vector_norm"]}
                log_to_loggers(trainer, "continual", metrics,
                               {"norms": bars(norms, "task-vector norm of each expert folded in", "‖τ‖")})

        on_rank_zero(trainer, fold, "ContinualMerge: folding the run into the state")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.load_merged:
            from lightning_merge.continual.state import ContinualState

            load_weights(pl_module, ContinualState(self.state).current_expert(), "ContinualMerge")  # sharded: shards


__all__ = ["ContinualMerge"]
