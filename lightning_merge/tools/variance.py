"""Per-task correction of variance collapse in merged models (non-local merges).

Experts that moved far from their base lose activation variance when merged: the merged model's hidden units
fire more weakly and at other offsets than any expert's. For chosen layers, :class:`VarianceCorrection` estimates
on a small calibration loader per task the per-channel mean and variance of the layer's output under that task's
expert and under the merged model, and, when the merged model serves that task, applies

    y = (x − μ_merged) / σ_merged · σ_expert + μ_expert        (σ = sqrt(var + eps))

through forward hooks: the identity where merged equals expert. Statistics are saved next to the merged model
(safetensors) and the task is picked at inference with ``with correction.task("name"):``.

Example::

    correction = VarianceCorrection.fit(merged, experts={"a": expert_a, "b": expert_b},
                                        loaders={"a": calib_a, "b": calib_b}, layers=["backbone.0", "backbone.2"])
    correction.attach(merged)
    with correction.task("a"):
        trainer.test(merged, test_a)
    correction.save("merged/variance_correction.safetensors")
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_merge.files.safetensors import SafetensorsError, SafetensorsFile, save_tensors

FORMAT = "lightning-merge/variance-correction"
VERSION = 1
FILENAME = "variance_correction.safetensors"
FIELDS = ("expert_mean", "expert_var", "merged_mean", "merged_var")
_CHANNEL_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                  nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm2d)


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``batch`` through ``model``: ``model(batch[0])`` for a tuple or list (inputs, targets),
    ``model(**batch)`` for a dict, ``model(batch)`` otherwise."""
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def resolve_layers(model: nn.Module, layers: Sequence[str] | str) -> list[str]:
    """Module names of ``model`` matching ``layers`` (exact names or glob patterns), in the model's order."""
    if isinstance(layers, str):
        layers = [layers]
    names = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for pattern in layers:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            near = [n for n in names if pattern.split(".")[-1] in n][:8] or names[:8]
            raise ValueError(f"no module of {type(model).__name__} matches layer {pattern!r}; module names look "
                             f"like {near}")
        found.extend(h for h in hits if h not in found)
    order = {n: i for i, n in enumerate(names)}
    return sorted(found, key=order.__getitem__)


class _Moments:
    """Per-channel count, sum and sum of squares (float64) of a layer's outputs."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: Tensor | None = None
        self.sumsq: Tensor | None = None

    def add(self, out: Tensor, channel_dim: int) -> None:
        x = out.detach().movedim(channel_dim, -1).reshape(-1, out.shape[channel_dim]).double()
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.sumsq = torch.zeros_like(self.sum)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += x.square().sum(0)

    def mean_var(self) -> tuple[Tensor, Tensor]:
        if self.count == 0:
            raise RuntimeError("no activations were recorded: the calibration loader is empty, or the layer never ran")
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean.square()).clamp(min=0)
        return mean.float().cpu(), var.float().cpu()


class VarianceCorrection:
    """Per-task, per-channel affine correction of chosen layers' outputs of a merged model.

    Args:
        layers: module names (or glob patterns, resolved against the merged model) whose outputs are corrected.
        eps: added to variances before the square root.

    Attributes:
        stats: ``stats[task][layer]`` maps ``expert_mean``, ``expert_var``, ``merged_mean``, ``merged_var`` to
            per-channel float32 tensors.
        channel_dims: the channel dimension of each layer's output (-1 for Linear-like layers, 1 for
            convolutions and norms over channels).
    """

    def __init__(self, layers: Sequence[str] | str, eps: float = 1e-5):
        self.layers: list[str] = [layers] if isinstance(layers, str) else list(layers)
        if not self.layers:
            raise ValueError("VarianceCorrection needs at least one layer to correct")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = float(eps)
        self.stats: dict[str, dict[str, dict[str, Tensor]]] = {}
        self.channel_dims: dict[str, int] = {}
        self._handles: list[Any] = []
        self._model: nn.Module | None = None
        self._active: str | None = None
        self._affine: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}

    # -- estimation ---------------------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        merged: nn.Module,
        experts: Mapping[str, nn.Module],
        loaders: Mapping[str, Iterable],
        layers: Sequence[str] | str,
        *,
        eps: float = 1e-5,
        forward: Callable[[nn.Module, Any], Any] = default_forward,
        max_batches: int | None = None,
        sequential: bool = True,
    ) -> VarianceCorrection:
        """Estimate the statistics of every task and return the correction (not yet attached).

        Args:
            merged: the merged model.
            experts: task name → that task's expert (same architecture as ``merged``).
            loaders: task name → a small calibration loader of that task's inputs (a few hundred examples).
            layers: the layers to correct: module names or glob patterns (``"encoder.layer.*.output.dense"``).
            eps: added to variances before the square root.
            forward: how to run a batch through a model (default: :func:`default_forward`).
            max_batches: stop each pass after this many batches.
            sequential: estimate the merged statistics of each layer with the corrections of the earlier layers
                in place (one calibration pass per layer; each corrected layer then matches its expert on the
                calibration data). False estimates every layer in one pass of the uncorrected merged model.
        """
        missing = sorted(set(experts) ^ set(loaders))
        if missing:
            raise ValueError(f"experts and loaders must name the same tasks; only one of them has {missing}")
        correction = cls(resolve_layers(merged, layers), eps=eps)
        for task in experts:
            correction.calibrate(merged, task, experts[task], loaders[task], forward=forward,
                                 max_batches=max_batches, sequential=sequential)
        return correction

    def calibrate(
        self,
        merged: nn.Module,
        task: str,
        expert: nn.Module,
        loader: Iterable,
        *,
        forward: Callable[[nn.Module, Any], Any] = default_forward,
        max_batches: int | None = None,
        sequential: bool = True,
    ) -> None:
        """Estimate (or re-estimate) one task's statistics. Arguments as in :meth:`fit`."""
        if not isinstance(task, str) or not task or "/" in task:
            raise ValueError(f"task names must be non-empty strings without '/', got {task!r}")
        modules = dict(merged.named_modules())
        for layer in self.layers:
            module = modules.get(layer)
            if module is None:
                raise ValueError(f"the merged model has no module named {layer!r}")
            self.channel_dims[layer] = 1 if isinstance(module, _CHANNEL_FIRST) else -1
        expert_moments = self._record(expert, self.layers, loader, forward, max_batches)
        entry: dict[str, dict[str, Tensor]] = {}
        for layer in self.layers:
            mean, var = expert_moments[layer].mean_var()
            entry[layer] = {"expert_mean": mean, "expert_var": var}
        self._affine = {k: v for k, v in self._affine.items() if k[0] != task}
        self.stats[task] = entry
        try:
            if sequential:
                for j, layer in enumerate(self.layers):
                    with self._temporarily_attached(merged, task, self.layers[:j]):
                        moments = self._record(merged, [layer], loader, forward, max_batches)
                    entry[layer]["merged_mean"], entry[layer]["merged_var"] = moments[layer].mean_var()
            else:
                with self._temporarily_attached(merged, None, []):
                    moments = self._record(merged, self.layers, loader, forward, max_batches)
                for layer in self.layers:
                    entry[layer]["merged_mean"], entry[layer]["merged_var"] = moments[layer].mean_var()
        except BaseException:  # nothing half-estimated stays (corrections cached from it included)
            del self.stats[task]
            self._affine = {k: v for k, v in self._affine.items() if k[0] != task}
            raise

    @contextlib.contextmanager
    def _temporarily_attached(self, model: nn.Module, task: str | None, layers: list[str]) -> Iterator[None]:
        """Corrections of ``layers`` for ``task`` on ``model`` while recording (the user's hooks paused)."""
        saved_handles, saved_active = self._handles, self._active
        for h in saved_handles:
            h.remove()
        self._handles = []
        try:
            if task is not None and layers:
                self._attach(model, layers)
                self._active = task
            yield
        finally:
            for h in self._handles:
                h.remove()
            self._handles, self._active = [], saved_active
            if saved_handles and self._model is not None:
                self._attach(self._model, self.layers)

    @torch.no_grad()
    def _record(self, model: nn.Module, layers: list[str], loader: Iterable, forward: Callable,
                max_batches: int | None) -> dict[str, _Moments]:
        modules = dict(model.named_modules())
        moments = {layer: _Moments() for layer in layers}
        handles = []
        for layer in layers:
            if layer not in modules:
                raise ValueError(f"{type(model).__name__} has no module named {layer!r} (an expert must have the "
                                 f"merged model's architecture)")

            def hook(module: nn.Module, args: Any, out: Any, layer: str = layer) -> None:
                moments[layer].add(_first_tensor(out, layer), self.channel_dims[layer])

            handles.append(modules[layer].register_forward_hook(hook))
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            for b, batch in enumerate(loader):
                if max_batches is not None and b >= max_batches:
                    break
                forward(model, _to_device(batch, device))
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        return moments

    # -- application --------------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        """The tasks with statistics."""
        return list(self.stats)

    def attach(self, model: nn.Module) -> VarianceCorrection:
        """Install the correction hooks on ``model`` (inactive until a task is chosen). Returns ``self``."""
        self.detach()
        self._model = model
        self._attach(model, self.layers)
        return self

    def _attach(self, model: nn.Module, layers: list[str]) -> None:
        modules = dict(model.named_modules())
        for layer in layers:
            if layer not in modules:
                raise ValueError(f"{type(model).__name__} has no module named {layer!r} to correct")

            def hook(module: nn.Module, args: Any, out: Any, layer: str = layer) -> Any:
                if self._active is None:
                    return None
                scale, shift = self.affine(self._active, layer)
                return _apply(out, scale, shift, self.channel_dims[layer])

            self._handles.append(modules[layer].register_forward_hook(hook))

    def detach(self) -> None:
        """Remove the hooks: the model computes as merged."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._model = None

    def set_task(self, task: str | None) -> None:
        """Correct for ``task`` from now on (None: no correction)."""
        if task is not None and task not in self.stats:
            raise KeyError(f"no variance-correction statistics for task {task!r}; tasks: {self.tasks}")
        self._active = task

    @contextlib.contextmanager
    def task(self, task: str | None) -> Iterator[VarianceCorrection]:
        """Correct for ``task`` inside the ``with`` block, then restore the previous choice."""
        previous = self._active
        self.set_task(task)
        try:
            yield self
        finally:
            self._active = previous

    def affine(self, task: str, layer: str) -> tuple[Tensor, Tensor]:
        """``(a, b)`` with ``y = a·x + b`` per channel: ``a = σ_expert/σ_merged``, ``b = μ_expert − a·μ_merged``."""
        key = (task, layer)
        if key not in self._affine:
            s = self.stats[task][layer]
            scale = (s["expert_var"] + self.eps).sqrt() / (s["merged_var"] + self.eps).sqrt().clamp(min=1e-12)
            shift = s["expert_mean"] - scale * s["merged_mean"]
            self._affine[key] = (scale, shift)
        return self._affine[key]

    # -- storage ------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics as safetensors (atomically); a folder gets ``variance_correction.safetensors``. An
        existing file there is replaced only if it is an earlier one (never a file lightning-merge did not write)."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        tensors = {f"{task}/{layer}/{field}": value.contiguous()
                   for task, layers in self.stats.items() for layer, fields in layers.items()
                   for field, value in fields.items()}
        meta = {"format": FORMAT, "version": str(VERSION), "eps": repr(self.eps),
                "layers": json.dumps(self.layers), "channel_dims": json.dumps(self.channel_dims),
                "tasks": json.dumps(self.tasks)}
        return save_tensors(path, tensors, meta, replace="own")  # replaces only an earlier one (its format marks it)

    @classmethod
    def load(cls, path: str | os.PathLike) -> VarianceCorrection:
        """Read statistics written by :meth:`save` (a file, or a folder holding ``variance_correction.safetensors``)."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no variance-correction statistics at {path}")
        try:
            with SafetensorsFile(path) as f:
                meta = f.metadata
                tensors = {k: f.get(k) for k in f.keys()}
        except SafetensorsError as err:
            raise ValueError(f"{err}; write it again with save()") from None
        if meta.get("format") != FORMAT or int(meta.get("version", "0")) > VERSION:
            raise ValueError(f"{path} is not variance-correction statistics this version reads "
                             f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
        correction = cls(json.loads(meta["layers"]), eps=float(meta["eps"]))
        correction.channel_dims = {k: int(v) for k, v in json.loads(meta["channel_dims"]).items()}
        for task in json.loads(meta["tasks"]):
            correction.stats[task] = {}
            for layer in correction.layers:
                try:
                    correction.stats[task][layer] = {f: tensors[f"{task}/{layer}/{f}"] for f in FIELDS}
                except KeyError as err:
                    raise ValueError(f"{path} lacks {err.args[0]!r}: the file is incomplete") from None
        return correction


def _first_tensor(out: Any, layer: str) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"layer {layer!r} returns {type(out).__name__}; choose a layer that returns a tensor")


def _apply(out: Any, scale: Tensor, shift: Tensor, channel_dim: int) -> Any:
    if isinstance(out, (tuple, list)):
        return type(out)([_apply(out[0], scale, shift, channel_dim), *out[1:]])
    shape = [1] * out.dim()
    shape[channel_dim] = -1
    scale = scale.to(device=out.device, dtype=out.dtype).view(shape)
    shift = shift.to(device=out.device, dtype=out.dtype).view(shape)
    return out * scale + shift


__all__ = ["VarianceCorrection", "default_forward", "resolve_layers"]
