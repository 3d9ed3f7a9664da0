"""The settings of :class:`~lightning_merge.callbacks.CurvatureCapture`: one frozen dataclass, validated once when it
is built (the callback builds it from its arguments; the arguments are documented there)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Literal

from lightning_merge.capture.fisher import ESTIMATORS
from lightning_merge.capture.fisher_accumulator import REDUCTIONS
from lightning_merge.capture.post_fit import LOADERS
from lightning_merge.formats.sidecar import COMPRESSIONS, GRAM_FORMS


@dataclasses.dataclass(frozen=True)
class CaptureConfig:
    """What a curvature capture records and where it writes it (see
    :class:`~lightning_merge.callbacks.CurvatureCapture` for each setting).

    Attributes:
        second_moments: record Adam's ``exp_avg_sq``.
        fisher: record the batch-empirical Fisher during training.
        loss_reduction: how the training loss reduces (``"auto"``, ``"example_mean"``, ``"token_mean"``, ``"sum"``).
        fisher_start_step: first optimizer step whose gradients are recorded.
        fisher_every_n_steps: record every n-th optimizer step.
        fisher_ema_decay: None (mean over the run) or an EMA decay in (0, 1).
        fisher_after_fit: the post-fit Fisher estimator (``"example"``, ``"true"``, ``"exact"``) or None.
        fisher_loader: ``"val"``, ``"train"``, ``"test"`` or an iterable of batches, read by the post-fit passes.
        fisher_examples: examples of the post-fit passes, over all ranks.
        fisher_samples: label draws per example of the true Fisher.
        compression: ``"float32"``, ``"bfloat16"`` or ``"rank1"``.
        checkpoint_sidecars: write a sidecar (and a PEFT adapter folder) next to every checkpoint.
        save_final: True, False, ``"full"`` or ``"adapter"``: what to write at fit end.
        adapter: the PEFT adapter to save (None: the active one).
        dirpath: folder of the final files (None: the checkpoint folder, else the Trainer's root).
        async_write: write checkpoint sidecars in a background thread.
        seed: seed of the true Fisher's label draws.
        gram: ``"train"``, ``"after_fit"`` or None: record linear layers' input Gram matrices.
        gram_form: ``"full"``, ``"diagonal"`` or ``"lowrank"``.
        gram_rank: the rank kept by ``gram_form="lowrank"``.

    Raises:
        ValueError: a setting out of its range, or settings that record nothing, naming the setting.
    """

    second_moments: bool = True
    fisher: bool = True
    loss_reduction: Literal["auto", "example_mean", "token_mean", "sum"] = "auto"
    fisher_start_step: int = 0
    fisher_every_n_steps: int = 1
    fisher_ema_decay: float | None = None
    fisher_after_fit: Literal["example", "true", "exact"] | None = None
    fisher_loader: Literal["val", "train", "test"] | Iterable[Any] = "val"
    fisher_examples: int = 512
    fisher_samples: int = 1
    compression: Literal["float32", "bfloat16", "rank1"] = "float32"
    checkpoint_sidecars: bool = True
    save_final: bool | Literal["full", "adapter"] = True
    adapter: str | None = None
    dirpath: str | None = None
    async_write: bool = True
    seed: int = 0
    gram: Literal["train", "after_fit"] | None = None
    gram_form: Literal["full", "diagonal", "lowrank"] = "full"
    gram_rank: int = 64

    def __post_init__(self) -> None:
        if not self.second_moments and not self.fisher and self.fisher_after_fit is None and self.gram is None:
            raise ValueError(
                "CurvatureCapture records nothing: enable second_moments, fisher, fisher_after_fit or gram"
            )
        if self.gram not in (None, "train", "after_fit"):
            raise ValueError(f"gram must be 'train', 'after_fit' or None, got {self.gram!r}")
        if self.gram_form not in GRAM_FORMS:
            raise ValueError(f"gram_form must be one of {', '.join(GRAM_FORMS)}, got {self.gram_form!r}")
        if isinstance(self.gram_rank, bool) or not isinstance(self.gram_rank, int) or self.gram_rank < 1:
            raise ValueError(f"gram_rank must be an integer >= 1, got {self.gram_rank!r}")
        if self.loss_reduction not in REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {', '.join(REDUCTIONS)}, got {self.loss_reduction!r}")
        if self.fisher_start_step < 0:
            raise ValueError(f"fisher_start_step must be >= 0, got {self.fisher_start_step}")
        if self.fisher_every_n_steps < 1:
            raise ValueError(f"fisher_every_n_steps must be >= 1, got {self.fisher_every_n_steps}")
        if self.fisher_ema_decay is not None and not 0.0 < self.fisher_ema_decay < 1.0:
            raise ValueError(f"fisher_ema_decay must be in (0, 1) or None, got {self.fisher_ema_decay}")
        if self.fisher_after_fit is not None and self.fisher_after_fit not in ESTIMATORS:
            raise ValueError(
                f"fisher_after_fit must be one of {', '.join(ESTIMATORS)} or None, got {self.fisher_after_fit!r}"
            )
        if isinstance(self.fisher_loader, str) and self.fisher_loader not in LOADERS:
            raise ValueError(
                f"fisher_loader must be one of {', '.join(LOADERS)} or an iterable of batches, got "
                f"{self.fisher_loader!r}"
            )
        if self.fisher_examples < 1:
            raise ValueError(f"fisher_examples must be >= 1, got {self.fisher_examples}")
        if self.fisher_samples < 1:
            raise ValueError(f"fisher_samples must be >= 1, got {self.fisher_samples}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        if self.save_final not in (True, False, "full", "adapter"):
            raise ValueError(f"save_final must be True, False, 'full' or 'adapter', got {self.save_final!r}")

    @property
    def loader_name(self) -> str:
        """The post-fit loader as messages name it: ``'val' dataloader``, or ``fisher_loader`` for an iterable."""
        return f"'{self.fisher_loader}' dataloader" if isinstance(self.fisher_loader, str) else "fisher_loader"

    @property
    def loader_label(self) -> str:
        """The post-fit loader as the sidecar metadata records it: its name, or ``"custom"`` for an iterable."""
        return self.fisher_loader if isinstance(self.fisher_loader, str) else "custom"

    def final_dir(self, checkpoint_dir: Any, default_root_dir: str) -> str:
        """The folder of the final files: ``dirpath``, else the checkpoint folder (when there is one), else the
        Trainer's ``default_root_dir``."""
        if self.dirpath is not None:
            return self.dirpath
        return str(checkpoint_dir) if checkpoint_dir else default_root_dir

    def writes_full_model(self, peft: bool) -> bool:
        """Whether fit end writes the full model (``final.safetensors``) rather than an adapter folder."""
        return self.save_final == "full" or (self.save_final is True and not peft)

    def writes_adapter(self) -> bool:
        """Whether fit end writes the PEFT adapter folder ``final.adapter/`` (when the model holds one)."""
        return self.save_final in (True, "adapter")


__all__ = ["CaptureConfig"]
