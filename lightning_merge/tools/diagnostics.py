"""See the merge: where experts agree and conflict, before and after a strategy merges them.

:func:`report` streams over the experts tensor by tensor, like a merge (memory: one tensor of every expert at a time),
and computes

- ``cosine``: the N×N cosine similarity of the whole-model task vectors τᵢ = θᵢ − θ₀ (all merged floating tensors);
- per tensor (``tensors[name]``): ``norm`` (‖τᵢ‖₂ per expert), ``sign_conflict`` (the fraction of entries where two
  experts have non-zero τ of opposite signs), ``statistic_mass`` (each expert's sum of Fisher / second moments, where
  captured);
- with a strategy, what its :meth:`~lightning_merge.strategies.Strategy.diagnose` returns: ``merged_norm`` (‖τ*‖ of
  the merge) for every strategy, and what it keeps per expert: ``kept`` (the density of each expert's sparsified task
  vector, and ``overlap``: the share of its kept entries another expert also keeps) for the task-vector family (TIES,
  DARE, Breadcrumbs, CABS, Generalized), ``tall_kept`` for consensus, ``winners`` (the share of entries whose median
  each expert supplies) for the weighted median, ``projected_share`` (the share of ‖τᵢ‖² OPCM's projection removes)
  for OPCM;
- per block (layer index from the tensor names): the same, aggregated.

:meth:`Report.save` writes a self-contained folder: ``index.html`` (opens offline: PNG figures beside it, no
scripts), ``report.json`` (every number behind the figures) and the PNGs.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_merge.engine.run import open_inputs, plan_merge, unique_names
from lightning_merge.strategies import functional as F
from lightning_merge.strategies.base import Strategy

BLOCK_PATTERN = F.BLOCK_PATTERN
KINDS = ("fisher", "exp_avg_sq")
CHUNK = 1 << 20  # columns per chunk of the float64 sums


@dataclasses.dataclass
class Report:
    """The numbers of a merge diagnosis (``data``, as ``report.json`` holds it) and its figures.

    Attributes:
        data: ``experts``, ``base``, ``strategy``, ``cosine``, ``tensors``, ``blocks``, ``evaluation``.
    """

    data: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def figures(self) -> dict[str, Any]:
        """``{file stem: matplotlib Figure}`` of every plot the data allows."""
        return _figures(self.data)

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``index.html``, ``report.json`` and the PNGs into ``folder`` (atomically: the folder appears
        complete or not at all). ``overwrite`` replaces an earlier report there, never anything lightning-merge did
        not write."""
        from lightning_merge.files.atomic import partial_path, writing
        from lightning_merge.files.outputs import check_output_path

        check_output_path(folder, overwrite, folder=True)
        folder = Path(folder)
        tmp = partial_path(folder)
        with writing(folder):  # a full disk or a read-only folder: one error naming the report's folder
            self._write(folder, tmp, overwrite)
        return folder

    def _write(self, folder: Path, tmp: Path, overwrite: bool) -> None:
        from lightning_merge.files.atomic import commit, fsync_tree
        from lightning_merge.files.ownership import write_record

        tmp.mkdir(parents=True)
        try:
            (tmp / "report.json").write_text(json.dumps(self.data, indent=1))
            figures = self.figures()
            import matplotlib.pyplot as plt

            for stem, figure in figures.items():
                figure.savefig(tmp / f"{stem}.png", dpi=110, bbox_inches="tight")
                plt.close(figure)
            (tmp / "index.html").write_text(_html(self.data, list(figures)))
            write_record(tmp, {"output": "report", "experts": self.data.get("experts")})
            fsync_tree(tmp)
            commit(tmp, folder, replace="own" if overwrite else "never")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def report(
    experts: Sequence[Any],
    base: Any,
    strategy: Strategy | None = None,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    pattern: str = BLOCK_PATTERN,
    on_missing_statistic: str = "uniform",
    sweeps: Mapping[str, Any] | None = None,
    merge_report: Any = None,
    continual: Sequence[Mapping[str, Any]] | None = None,
    progress: bool | None = None,
) -> Report:
    """Diagnose experts (and, with ``strategy``, what a merge of them keeps), streaming tensor by tensor.

    Args:
        experts: the experts, as for :func:`lightning_merge.merge`.
        base: their base (task vectors need one).
        strategy: a strategy whose merge to diagnose (None: the experts only).
        include: glob patterns of the tensors to look at (default all floating tensors).
        exclude: glob patterns of tensors to leave out.
        pattern: a regular expression with one group capturing a tensor's block (layer) index.
        on_missing_statistic: for a strategy that needs statistics an expert lacks (``"uniform"`` by default: a
            report should not fail where a merge would).
        sweeps: ``{label: SweepResult}`` to plot the λ curves of.
        merge_report: a :class:`~lightning_merge.tools.evaluation.MergeReport` to chart.
        continual: the scores after each continual add, ``[{"count": t, "scores": {task: score}}, ...]``.
        progress: a progress bar (default: when stderr is a terminal).

    Returns:
        A :class:`Report` (``.save(folder)`` writes it, ``.figures()`` draws it).
    """
    from lightning_merge.files.progress import track
    from lightning_merge.strategies.linear import Linear

    opened, base_expert = open_inputs(experts, base)
    if base_expert is None:
        raise ValueError("report() compares task vectors: it needs base= the model the experts were fine-tuned from")
    plan = plan_merge(opened, base_expert, strategy or Linear(), include=include, exclude=exclude,
                      on_missing="base", on_missing_statistic=on_missing_statistic, progress=progress)
    n = len(opened)
    names = [name for name in plan.names if name in base_expert]
    gram = torch.zeros(n, n, dtype=torch.float64)
    tensors: dict[str, dict[str, Any]] = {}
    kinds = [k for k in KINDS if all(e.has_statistic(k) for e in opened)]
    for name in track(names, [plan.spec(nm).nbytes * (n + 1) for nm in names], "report", progress):
        b = plan.base_tensor(name)
        experts = plan.expert_tensors(name, b)
        merged = None
        if strategy is not None:  # merged first, from the experts as the merge reads them (then they become τ)
            raw = plan.prepared.merge_tensor(name, b, experts, plan.stats(name))
            merged = raw.sub_(b) if not _shares_memory(raw, [*experts, b]) else raw - b
            del raw
        taus = torch.empty((n, *b.shape), dtype=torch.float32)
        for i in range(n):  # τᵢ written into one buffer, each expert's tensor released as soon as it is used
            torch.sub(experts[i], b, out=taus[i])
            experts[i] = None  # type: ignore[call-overload]
        del experts, b
        flat = taus.reshape(n, -1)
        products, conflicts = _gram_and_conflicts(flat)
        gram += products
        entry: dict[str, Any] = {
            "numel": flat.shape[1],
            "block": F.block_index(name, pattern),
            "norm": [math.sqrt(max(float(v), 0.0)) for v in products.diagonal()],
            "sign_conflict": conflicts / max(flat.shape[1], 1),
        }
        if kinds:
            entry["statistic_mass"] = {
                k: [float(e.statistic(name, k).sum(dtype=torch.float64)) for e in opened] for k in kinds
            }
        if strategy is not None:  # the strategy's own view (it may sparsify taus: their last use)
            entry.update(strategy.diagnose(plan, name, taus, merged))
            del merged
        del taus, flat
        tensors[name] = entry
    diag = gram.diagonal().clamp(min=1e-300).sqrt()
    cosine = (gram / diag[:, None] / diag[None, :]).tolist()
    data = {
        "experts": unique_names(opened),
        "base": base_expert.name,
        "strategy": strategy.to_dict() if strategy is not None else None,
        "prepared": plan.prepared.summary() if strategy is not None else {},
        "cosine": cosine,
        "tensors": tensors,
        "blocks": _blocks(tensors, n),
        "evaluation": _evaluation(sweeps, merge_report, continual),
    }
    return Report(data)


def _gram_and_conflicts(flat: Tensor) -> tuple[Tensor, int]:
    """``(Σ τᵢ·τⱼ over the tensor (N × N, float64), entries where two experts' τ have opposite signs)``, in column
    chunks so the float64 copies stay small."""
    n = flat.shape[0]
    gram = torch.zeros(n, n, dtype=torch.float64)
    conflicts = 0
    for start in range(0, flat.shape[1], CHUNK):
        part = flat[:, start:start + CHUNK]
        wide = part.double()
        gram += wide @ wide.T
        conflicts += int(((part > 0).any(0) & (part < 0).any(0)).sum())
    return gram, conflicts


def _shares_memory(tensor: Tensor, others: Sequence[Tensor | None]) -> bool:
    """Whether ``tensor`` may alias one of ``others`` (a strategy may return an input, or a view of one)."""
    storage = tensor.untyped_storage().data_ptr()
    return any(o is not None and o.untyped_storage().data_ptr() == storage for o in others)


def _blocks(tensors: Mapping[str, Mapping[str, Any]], n: int) -> dict[str, dict[str, Any]]:
    """Per block (layer index, or ``"other"``): norms as the L2 over its tensors, sign conflict weighted by size,
    statistic masses summed, kept densities over its entries."""
    out: dict[str, dict[str, Any]] = {}
    for entry in tensors.values():
        key = str(entry["block"]) if entry["block"] is not None else "other"
        agg = out.setdefault(key, {"numel": 0, "norm_sq": [0.0] * n, "conflicts": 0.0, "merged_sq": 0.0})
        agg["numel"] += entry["numel"]
        agg["norm_sq"] = [a + v * v for a, v in zip(agg["norm_sq"], entry["norm"])]
        agg["conflicts"] += entry["sign_conflict"] * entry["numel"]
        if "merged_norm" in entry:
            agg["merged_sq"] += entry["merged_norm"] ** 2
        for kind, masses in entry.get("statistic_mass", {}).items():
            agg.setdefault("statistic_mass", {}).setdefault(kind, [0.0] * n)
            agg["statistic_mass"][kind] = [a + v for a, v in zip(agg["statistic_mass"][kind], masses)]
        if "kept" in entry:
            k = agg.setdefault("kept_counts", {"kept": [0] * n, "shared": [0] * n})
            k["kept"] = [a + v for a, v in zip(k["kept"], entry["kept"]["kept"])]
            k["shared"] = [a + v for a, v in zip(k["shared"], entry["kept"]["shared"])]
        for field in ("winners", "tall_kept", "weight_share"):  # shares of entries: weighted by the tensor's size
            if field in entry:
                acc = agg.setdefault(field, [0.0] * n)
                agg[field] = [a + v * entry["numel"] for a, v in zip(acc, entry[field])]
        if "projected_share" in entry:
            p = agg.setdefault("projected", {"removed": [0.0] * n, "total": [0.0] * n})
            p["removed"] = [a + s * t for a, s, t in zip(p["removed"], entry["projected_share"], entry["tau_sq"])]
            p["total"] = [a + t for a, t in zip(p["total"], entry["tau_sq"])]
    blocks = {}
    for key in sorted(out, key=lambda k: (k == "other", int(k) if k != "other" else 0)):
        agg = out[key]
        block: dict[str, Any] = {
            "numel": agg["numel"],
            "norm": [math.sqrt(v) for v in agg["norm_sq"]],
            "sign_conflict": agg["conflicts"] / max(agg["numel"], 1),
        }
        if agg["merged_sq"]:
            block["merged_norm"] = math.sqrt(agg["merged_sq"])
        if "statistic_mass" in agg:
            block["statistic_mass"] = agg["statistic_mass"]
        if "kept_counts" in agg:
            k = agg["kept_counts"]
            block["kept"] = {"density": [c / max(agg["numel"], 1) for c in k["kept"]],
                             "overlap": [s / c if c else 0.0 for s, c in zip(k["shared"], k["kept"])]}
        if "projected" in agg:
            p = agg["projected"]
            block["projected_share"] = [r / t if t else 0.0 for r, t in zip(p["removed"], p["total"])]
        for field in ("winners", "tall_kept", "weight_share"):
            if field in agg:
                block[field] = [v / max(agg["numel"], 1) for v in agg[field]]
        blocks[key] = block
    return blocks


def _evaluation(sweeps: Mapping[str, Any] | None, merge_report: Any, continual: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if sweeps:
        out["sweeps"] = {label: {"best": r.scale, "scores": {str(k): v for k, v in r.scores.items()}}
                         for label, r in sweeps.items()}
    if merge_report is not None:
        out["merge_report"] = merge_report.as_dict()
    if continual:
        out["continual"] = [dict(c) for c in continual]
    return out


# -- figures -------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _heatmap(plt: Any, matrix: list[list[float]], rows: list[str], cols: list[str], title: str, label: str,
             annotate: bool = False, log: bool = False) -> Any:
    import numpy as np

    values = np.array(matrix, dtype=float)
    longest = max((len(c) for c in cols), default=0)
    fig, ax = plt.subplots(figsize=(1.6 + 0.7 * len(cols), 1.0 + 0.32 * len(rows) + 0.06 * longest))
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("#dddddd")  # no value: an empty block, a statistic of zero (log scale)
    if log:  # the scale spans the values present; zeros are shown grey, not as log10(1e-30)
        positive = values > 0
        shown = np.ma.masked_array(np.log10(np.where(positive, values, 1.0)), mask=~positive)
    else:
        shown = values
    im = ax.imshow(shown, aspect="auto", cmap=cmap)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=("log10 " if log else "") + label)
    fig.tight_layout()
    if annotate:
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    return fig


def _figures(data: Mapping[str, Any]) -> dict[str, Any]:
    plt = _pyplot()
    experts = expert_labels(data["experts"])  # what tells them apart, not a clipped tail of each path
    blocks = data["blocks"]
    rows = list(blocks)
    figs: dict[str, Any] = {}
    figs["cosine"] = _heatmap(plt, data["cosine"], experts, experts, "cosine similarity of task vectors", "cosine",
                              annotate=len(experts) <= 12)
    figs["norms"] = _heatmap(plt, [blocks[r]["norm"] for r in rows], rows, experts, "‖τᵢ‖ per block", "L2 norm")
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(rows, [blocks[r]["sign_conflict"] for r in rows], marker="o")
    ax.set_xlabel("block")
    ax.set_ylabel("share of entries")
    ax.set_title("sign conflicts: entries where two experts' τ have opposite signs", fontsize=10)
    figs["sign_conflict"] = fig
    for kind in KINDS:
        if all(kind in blocks[r].get("statistic_mass", {}) for r in rows) and rows:
            figs[f"statistics_{kind}"] = _heatmap(plt, [blocks[r]["statistic_mass"][kind] for r in rows], rows,
                                                  experts, f"{kind} mass per block", "sum", log=True)
    if rows and all("kept" in blocks[r] for r in rows):
        figs["kept"] = _heatmap(plt, [blocks[r]["kept"]["density"] for r in rows], rows, experts,
                                "density each expert keeps after sparsification", "density")
        figs["overlap"] = _heatmap(plt, [blocks[r]["kept"]["overlap"] for r in rows], rows, experts,
                                   "share of kept entries another expert keeps too", "overlap")
    for field, title in (("winners", "share of entries whose weighted median each expert supplies"),
                         ("tall_kept", "TALL mask density per expert (consensus)"),
                         ("weight_share", "each expert's share of the merge's weight (precision-weighted)")):
        if rows and all(field in blocks[r] for r in rows):
            figs[field] = _heatmap(plt, [blocks[r][field] for r in rows], rows, experts, title, "share")
    if rows and all("projected_share" in blocks[r] for r in rows):
        figs["projected"] = _heatmap(plt, [blocks[r]["projected_share"] for r in rows], rows, experts,
                                     "share of ‖τᵢ‖² OPCM's projection removes", "share")
    if rows and all("merged_norm" in blocks[r] for r in rows):
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(rows, [blocks[r]["merged_norm"] for r in rows], marker="o", label="‖τ*‖ (merged)")
        ax.plot(rows, [sum(blocks[r]["norm"]) / len(experts) for r in rows], marker=".", ls="--",
                label="mean ‖τᵢ‖")
        ax.set_xlabel("block")
        ax.legend(fontsize=8)
        ax.set_title("the merged task vector per block", fontsize=10)
        figs["merged_norm"] = fig
    evaluation = data.get("evaluation", {})
    if evaluation.get("sweeps"):
        fig, ax = plt.subplots(figsize=(6, 3))
        for label, sweep in evaluation["sweeps"].items():
            xs = sorted(float(k) for k in sweep["scores"])
            ax.plot(xs, [sweep["scores"][_key(sweep["scores"], x)] for x in xs], marker="o", label=label)
        ax.set_xlabel("λ (scale)")
        ax.set_ylabel("validation score")
        ax.legend(fontsize=8)
        ax.set_title("λ sweeps", fontsize=10)
        figs["sweeps"] = fig
    if evaluation.get("continual"):
        fig, ax = plt.subplots(figsize=(6, 3))
        points = evaluation["continual"]
        tasks = sorted({t for p in points for t in p["scores"]})
        for task in tasks:
            ax.plot([p["count"] for p in points if task in p["scores"]],
                    [p["scores"][task] for p in points if task in p["scores"]], marker="o", label=task)
        ax.set_xlabel("experts folded in")
        ax.set_ylabel("score")
        ax.legend(fontsize=8)
        ax.set_title("continual merging", fontsize=10)
        figs["continual"] = fig
    return figs


def strategy_text(spec: Mapping[str, Any]) -> str:
    """A strategy's ``to_dict()`` as a reader writes it: ``fisher(scale=1.0, floor=1e-06)`` (its arguments that
    are set, in order)."""
    arguments = ", ".join(f"{k}={v!r}" for k, v in spec.items() if k != "name" and v is not None)
    return f"{spec.get('name', '?')}({arguments})"


def expert_labels(names: Sequence[str]) -> list[str]:
    """Short labels that tell the experts apart: the path components all names share at the start and at the end
    are dropped (``runs/up/final.adapter``, ``runs/down/final.adapter`` → ``up``, ``down``); names that stay equal
    get ``#i``."""
    parts = [n.replace("\\", "/").rstrip("/").split("/") for n in names]
    if len(parts) > 1:
        while all(len(p) > 1 for p in parts) and len({p[0] for p in parts}) == 1:
            parts = [p[1:] for p in parts]
        while all(len(p) > 1 for p in parts) and len({p[-1] for p in parts}) == 1:
            parts = [p[:-1] for p in parts]
    labels = ["/".join(p) if len(names) > 1 else p[-1] for p in parts]
    return [f"{label}#{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def _key(scores: Mapping[str, Any], x: float) -> str:
    return next(k for k in scores if float(k) == x)


def _html(data: Mapping[str, Any], figures: list[str]) -> str:
    esc = html.escape
    experts = data["experts"]
    captions = {
        "cosine": "Cosine similarity of the whole-model task vectors: experts that point the same way merge with "
                  "little interference.",
        "norms": "How far each expert moved from the base, block by block.",
        "sign_conflict": "Where experts pull the same entries in opposite directions: what sign election resolves.",
        "kept": "What the strategy's sparsification keeps of each expert.",
        "overlap": "How much of what each expert keeps another expert keeps too.",
        "projected": "What OPCM's orthogonal projection removes from each expert (the first is kept whole).",
        "merged_norm": "The merged task vector against the experts' mean: a shrinking merge is interference.",
        "sweeps": "Validation score against the scale λ.",
        "continual": "Scores after each expert is folded in.",
        "winners": "Which expert the weighted median takes each entry from.",
        "weight_share": "What the precision weighting keeps of each expert: its mean share wᵢPᵢ / Σⱼ wⱼPⱼ of the "
                        "weight, block by block (Fisher: the Fisher; OTA: the second moments).",
        "tall_kept": "Where each expert's own update dominates (TALL masks): consensus keeps entries at least k "
                     "masks keep.",
    }
    rows = "".join(
        f"<tr><th>{esc(a)}</th>" + "".join(f"<td>{v:.3f}</td>" for v in row) + "</tr>"
        for a, row in zip(experts, data["cosine"])
    )
    head = "<tr><th></th>" + "".join(f"<th>{esc(e)}</th>" for e in experts) + "</tr>"
    images = "".join(
        f'<figure><img src="{esc(stem)}.png" alt="{esc(stem)}"><figcaption>'
        f"{esc(captions.get(stem, stem.replace('_', ' ')))}</figcaption></figure>"
        for stem in figures
    )
    strategy = esc(strategy_text(data["strategy"])) if data["strategy"] else "none (the experts only)"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lightning-merge report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}
figure{{display:inline-block;margin:1em;vertical-align:top;max-width:520px}}img{{max-width:100%}}
figcaption{{font-size:13px;color:#555}}</style></head>
<body><h1>Merge report</h1>
<p>Base: <code>{esc(data["base"])}</code>. Strategy: <code>{strategy}</code>.
Every number is in <a href="report.json">report.json</a>.</p>
<h2>Cosine similarity of task vectors</h2><table>{head}{rows}</table>
<h2>Figures</h2>{images}
</body></html>
"""


__all__ = ["BLOCK_PATTERN", "Report", "expert_labels", "report", "strategy_text"]
