"""Merge quality on real data that ships offline: normalized accuracy of every strategy, λ chosen on validation.

Digits (scikit-learn): a backbone pre-trained briefly on 10-way digits; four experts fine-tuned with Lightning and
CurvatureCapture on different tasks (label functions and input transforms), each with its own head; backbones
merged; per-task accuracy with each expert's head; normalized = merged ÷ expert, averaged over tasks. Mean ± std
over seeds. Also: each statistics compression (float32, bfloat16, rank-1) through a real sidecar round trip.

    python benchmarks/merge_quality.py [--seeds 3] [--epochs 12]
    python benchmarks/merge_quality.py --part minilm --cache /tmp/minilm-experts --only ota  # reuses the experts
    python benchmarks/merge_quality.py --part digits --steps 50,400,3000 --only "v̂)" "raw v)"  # unequal lengths
    python benchmarks/merge_quality.py --part minilm --only task_arithmetic =tsv_merge  # "=": that row name exactly

``--only`` keeps the rows whose name contains one of its words; a word that starts with ``=`` keeps the row of
exactly that name (``=tsv_merge``: TSV-M, not its curvature-metric variants).

``--steps`` fine-tunes the digits experts for unequal numbers of optimizer steps instead of ``--epochs`` (expert
t of seed s: ``steps[(t + s) % len(steps)]``, so no task is always the short one; with 3 lengths the 4th task
repeats the 1st's): the setting where OTA's bias-corrected v̂ and the reference's raw v weigh the experts
differently (docs/strategies.md, OTA).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import tempfile
import time
import types
from pathlib import Path

import torch

from lightning_merge import (
    OTA,
    PCB,
    WIDEN,
    WUDI,
    Breadcrumbs,
    Cabs,
    CATMerging,
    Consensus,
    Dare,
    DogeTA,
    Expert,
    Fisher,
    Generalized,
    IsoC,
    IsoCTS,
    Linear,
    LiNeS,
    RegMean,
    TaskArithmetic,
    Ties,
    TSVMerge,
    WeightedMedian,
    merge,
)
from lightning_merge.cli.demo import TASKS, train_digits_experts
from lightning_merge.formats.sidecar import Statistics, write_statistics
from lightning_merge.tools.evaluation import normalized_score, sweep, sweep_scale

GRID = (0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0, 2.5)
# MiniLM: the curvature merges' λ reached the top of GRID there (2.5 for OTA mean-normalized on 2 of 3 seeds), so its
# sweep goes on to 3.5 (--wide-grid)
WIDE_GRID = (*GRID, 3.0, 3.5)
# ISO-C / ISO-CTS flatten the spectrum to its mean singular value, far below the sum's leading ones: on digits their λ
# reached the top of GRID (2.5) on every seed, so their sweep goes on to 6
ISO_GRID = (*GRID, 3.0, 3.5, 4.0, 5.0, 6.0)
# DOGE-TA's coefficients are lamda/‖τᵢ‖ per tensor (the reference: 0.07, for CLIP ViT-B/32); it has no scale of its
# own, so lamda is what validation chooses (λ stays 1)
DOGE_LAMDAS = (0.03, 0.07, 0.15, 0.3, 0.6, 1.0, 1.5, 2.5, 4.0, 6.0, 10.0)


def strategies() -> dict[str, object]:
    return {
        "average": Linear(),
        "task_arithmetic": TaskArithmetic(),
        "ties (density 0.2)": Ties(density=0.2),
        "dare_ties (p 0.5)": Dare(drop_rate=0.5, combine="ties"),
        "breadcrumbs": Breadcrumbs(density=0.9, gamma=0.01),
        "fisher (batch)": Fisher(estimator="batch"),
        "fisher (per-example)": Fisher(estimator="example"),
        "fisher (batch, no norm)": Fisher(estimator="batch", normalize=False),
        "ota": OTA(),
        "ota + ffg (density 0.3)": OTA(density=0.3),
        # the second-moment form, named whatever the default (issue 33): they differ when the experts ran unequal
        # numbers of steps (--steps)
        "ota (bias-corrected v̂)": OTA(bias_correct=True),
        "ota (raw v)": OTA(bias_correct=False),
        "ota + ffg 0.3 (bias-corrected v̂)": OTA(density=0.3, bias_correct=True),
        "ota + ffg 0.3 (raw v)": OTA(density=0.3, bias_correct=False),
        "weighted_median (batch)": WeightedMedian(estimator="batch"),
        "tsv_merge": TSVMerge(),
        # issue 33: the newest data-free subspace methods (FusionBench's defaults; λ on validation like the others)
        "iso_c": ("scales", IsoC(), ISO_GRID),
        "iso_cts (f 0.8)": ("scales", IsoCTS(), ISO_GRID),
        "wudi (adam, 300 steps, lr 1e-5)": WUDI(),
        "wudi (exact optimum)": WUDI(solver="exact"),
        # issue 33: WIDEN (the authors' widen_merging): their defaults (ratio 1, calibration 1), and with the
        # calibration off (ratio 3: ranks never exceed twice their mean), λ on validation like the others
        "widen (ratio 1, calibration 1: the reference's)": WIDEN(),
        "widen, calibration off (ratio 3)": WIDEN(above_average_value_ratio=3.0),
        # issue 33: DOGE-TA (FusionBench's doge_ta): as published (lamda 0.07, no scale), then its lamda on validation
        # with the biases at the base (the reference) or at the mean task vector (others="mean")
        "doge_ta (lamda 0.07, as published)": ("scales", DogeTA(), (1.0,)),
        "doge_ta, lamda on validation": ("sweep", DogeTA(), {"lamda": DOGE_LAMDAS}, (1.0,)),
        "doge_ta, others mean, lamda on validation": ("sweep", DogeTA(others="mean"), {"lamda": DOGE_LAMDAS},
                                                      (1.0,)),
        # issue 33: TSV-M in the metric of the captured curvature (docs/strategies.md)
        "tsv_merge, gram metric (α 0.95, δ 0.01)": TSVMerge(metric="gram"),
        "tsv_merge, gram metric, δ on validation": ("sweep", TSVMerge(metric="gram"),
                                                    {"damping": (0.0, 0.01, 0.1, 1.0)}),
        "tsv_merge, gram metric, δ 0.3–10 on validation": ("sweep", TSVMerge(metric="gram"),
                                                          {"damping": (0.3, 1.0, 3.0, 10.0)}),
        "tsv_merge, fisher (batch) metric": TSVMerge(metric="fisher.batch"),
        "tsv_merge, exp_avg_sq metric, δ 0.3–10 on validation": ("sweep", TSVMerge(metric="exp_avg_sq"),
                                                                {"damping": (0.3, 1.0, 3.0, 10.0)}),
        "tsv_merge, exp_avg_sq metric": TSVMerge(metric="exp_avg_sq"),
        "tsv_merge, fisher (batch) mask 0.3": TSVMerge(mask="fisher.batch", density=0.3),
        "tsv_merge, fisher (batch) mask, density on validation": ("sweep", TSVMerge(mask="fisher.batch"),
                                                                  {"density": (0.1, 0.3, 0.5, 0.7)}),
        "tsv_merge, gram metric + fisher (batch) mask 0.3": TSVMerge(metric="gram", mask="fisher.batch", density=0.3),
        "pcb (ratio 0.1)": PCB(ratio=0.1),
        "pcb (ratio 0.2)": PCB(ratio=0.2),
        # the references' options (docs/strategies.md): OTA's per-tensor mean normalisation (`normalise: global`,
        # not the reference's default, which is OTA()), Fisher's floor on the target (first) model only
        "ota, mean-normalized (reference option)": OTA(mean_normalize=True),
        "fisher (batch), favor target (reference)": Fisher(estimator="batch", favor_target=True),
        # issue 8: CABS against magnitude-pruned TIES at equal density, and the ablation without conflict-awareness
        "ties (density 0.25)": Ties(density=0.25),
        "magnitude 0.25, no election": Generalized(sparsification="magnitude", density=0.25),
        "cabs 64:256": Cabs(n=64, m=256),
        "ties (density 3/32)": Ties(density=3 / 32),
        "cabs 3:32": Cabs(n=3, m=32),
        "consensus (TA, k 2)": Consensus(),
        "consensus (TIES 0.2, k 2)": Consensus(sparsification="magnitude", density=0.2, election="weighted",
                                               normalize=True),
        "consensus (TALL reference)": Consensus.tall_reference(),
        "dare p0.5 + fisher weights": Dare(drop_rate=0.5, weighting="fisher"),
        "saliency 0.2 + ties election": Generalized(sparsification="saliency", density=0.2, election="weighted",
                                                    normalize=True),
        "lines (task arithmetic)": LiNeS(TaskArithmetic()),
        "lines (fisher)": LiNeS(Fisher(estimator="batch")),
        "regmean (α 0.95)": "regmean-published",   # as published: no scale
        "regmean (α on validation)": "regmean-tuned",
        "regmean (α 0.95), λ on validation": RegMean(),  # an extension: θ₀ + λ·τ*, λ swept like task arithmetic's
        # issue 33: CAT Merging from the same Gram matrices: as published (λ 5, 4 directions, scale 0.4), its scale on
        # validation, and its lambd and ratio on validation with the scale
        "cat_merging (as published: lambd 5, ratio 4, scale 0.4)": ("scales", CATMerging(), (0.4,)),
        "cat_merging, scale on validation": CATMerging(),
        "cat_merging, lambd and ratio on validation": ("sweep", CATMerging(),
                                                       {"lambd": (0.1, 0.25, 0.5, 2.0, 5.0), "ratio": (1, 2, 4)}),
        # more arguments on validation (lightning_merge.sweep, every combination × the λ grid): OTA's exponent on v̂,
        # and per-expert weights λᵢ as Matena & Raffel tune Fisher merging's
        "ota, power on validation": ("sweep", OTA(), {"power": (0.25, 0.5, 0.75, 1.0)}),
        "ota, per-expert weights on validation": ("sweep", OTA(), lambda n: {"weights": weight_grid(n)}),
    }


def wanted(name: str, only: list[str] | None) -> bool:
    """Whether the row ``name`` runs under ``--only``: no list, a word the name contains, or ``=name`` exactly."""
    return not only or any(name == o[1:] if o.startswith("=") else o in name for o in only)


def weight_grid(n: int, values: tuple[float, ...] = (0.5, 1.0, 2.0)) -> list[list[float]]:
    """Every per-expert weight vector from ``values``, once per direction (OTA and Fisher are invariant to a
    common factor: (2, 2, 2) is (1, 1, 1))."""
    import itertools

    seen, out = set(), []
    for w in itertools.product(values, repeat=n):
        key = tuple(round(x / max(w), 6) for x in w)
        if key not in seen:
            seen.add(key)
            out.append(list(w))
    return out


BETAS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
ALPHAS = (0.0, 0.3, 0.6, 0.9, 0.95, 1.0)


def tuned(strategy, experts, base, score, grid=GRID, **merge_kwargs):
    """(state, chosen value): λ swept for strategies with a scale; LiNeS' β swept (α from its norm rule); RegMean's
    α swept for "regmean-tuned"; ``("scales", strategy, grid)``: λ on that grid; for ``("sweep", strategy,
    arguments[, scales])`` every combination of ``arguments`` (a grid, or a function of the number of experts giving
    one) with λ (on ``scales`` when given), by ``lightning_merge.sweep``."""
    if isinstance(strategy, tuple) and strategy[0] == "scales":  # λ on a grid of its own
        result = sweep_scale(strategy[1], experts, base, score, strategy[2], **merge_kwargs)
        return result.state, result.scale
    if isinstance(strategy, tuple) and strategy[0] == "sweep":
        _, inner, arguments, *scales = strategy
        if callable(arguments):
            arguments = arguments(len(experts))
        result = sweep(inner, experts, base, score, arguments, scales=scales[0] if scales else grid, **merge_kwargs)
        chosen = ", ".join(f"{k} {getattr(result.strategy, k)}" for k in arguments)
        return result.state, f"{chosen}, λ {result.strategy.scale:g}"
    if strategy == "regmean-published":
        return merge(experts, base, RegMean(), **merge_kwargs), None
    if strategy == "regmean-tuned":
        states = {a: merge(experts, base, RegMean(alpha=a), **merge_kwargs) for a in ALPHAS}
        best = max(states, key=lambda a: (score(states[a]), a))
        return states[best], best
    if isinstance(strategy, LiNeS):
        states = {b: merge(experts, base, dataclasses.replace(strategy, beta=b), **merge_kwargs) for b in BETAS}
        best = max(states, key=lambda b: (score(states[b]), -b))
        return states[best], best
    if hasattr(strategy, "scale"):
        result = sweep_scale(strategy, experts, base, score, grid, **merge_kwargs)
        return result.state, result.scale
    return merge(experts, base, strategy, **merge_kwargs), None


FUSION_BENCH = next((c for c in (os.environ.get("FUSION_BENCH_PYTHON"),
                                  str(Path(__file__).resolve().parents[1] / ".venv-fusionbench" / "bin" / "python"))
                     if c and Path(c).exists()), None)
FUSION_BENCH_ROW = "regmean, FusionBench's merge on the same Gram matrices (α 0.95)"
FUSION_BENCH_REGMEAN = """
import sys, torch
from fusion_bench.method.regmean.regmean import merging_with_regmean_weights
d = torch.load(sys.argv[1], weights_only=True)
torch.save(merging_with_regmean_weights(d["params"], d["grams"], reduce_non_diagonal_ratio=d["alpha"]), sys.argv[2])
"""


def fusionbench_regmean(experts: list[Expert], alpha: float, folder: Path, base: dict | None = None,
                        names: list[str] | None = None) -> dict | str:
    """FusionBench's RegMean merge (its own function, in its environment) of the experts' tensors ``names`` (default:
    all) with the Gram matrices they captured (the mean xxᵀ: FusionBench's convention), keyed by module name as it
    expects; the other tensors from ``base``. Returns the state, or the reason it failed (its last line)."""
    names = names or experts[0].names()
    params = {n: [e.tensor(n).float() for e in experts] for n in names}
    grams = [{n[: -len(".weight")]: e.statistic(n, "gram") for n in names
              if n.endswith(".weight") and len(e.spec(n).shape) == 2} for e in experts]
    torch.save({"params": params, "grams": grams, "alpha": alpha}, folder / "fb-in.pt")
    done = subprocess.run([FUSION_BENCH, "-c", FUSION_BENCH_REGMEAN, str(folder / "fb-in.pt"),
                           str(folder / "fb-out.pt")], capture_output=True, text=True)
    if done.returncode:
        return [line for line in done.stderr.splitlines() if "Error" in line][-1].strip()
    return {**(base or {}), **torch.load(folder / "fb-out.pt", weights_only=True)}


class _TaskInputs(torch.utils.data.Dataset):
    """Unlabeled inputs of every task at once: item i is ``{task: x_task[i mod n_task]}``."""

    def __init__(self, inputs: dict[str, torch.Tensor]):
        self.inputs = inputs

    def __len__(self) -> int:
        return max(len(x) for x in self.inputs.values())

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {task: x[i % len(x)] for task, x in self.inputs.items()}


def adamerging(setup, granularity: str, steps: int = 1000, seed: int = 0) -> dict:
    """AdaMerging on the digits experts: λ learned by entropy minimisation on the tasks' *validation inputs*
    (labels unused), each task through its own head; FusionBench's settings (λ₀ 0.3, Adam 1e-3, 1000 steps, batch
    16 per task). Returns the merged backbone's state, written by merge() from the learned strategy."""
    import lightning.pytorch as pl

    from lightning_merge.cli.demo import make_backbone, task_data
    from lightning_merge.tools.adamerging import AdaMerging

    heads = {task.name: head.requires_grad_(False) for task, head in zip(setup.tasks, setup.heads)}
    inputs = {task.name: task_data(task, setup.splits["val"])[0] for task in setup.tasks}

    def logits_fn(ada, batch):
        return {name: heads[name](ada(x)) for name, x in batch.items()}

    ada = AdaMerging(make_backbone(), setup.experts, setup.base, granularity=granularity, logits_fn=logits_fn)
    pl.seed_everything(seed, verbose=False)
    loader = torch.utils.data.DataLoader(_TaskInputs(inputs), batch_size=16, shuffle=True)
    pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(ada, loader)
    return merge(setup.experts, setup.base, ada.strategy())


def fw_merging(setup, granularity: str, seed: int = 0, iterations: int = 10, examples: int = 100,
               step_size: float = 0.1) -> dict:
    """FW-Merging (hard) on the digits experts: Frank–Wolfe over the four experts and the initial task-arithmetic
    merge, gradients of the cross-entropy on the tasks' *labelled validation* examples, each task through its own
    head; FusionBench's defaults (10 iterations, step_size 0.1, scaling_factor 0.3, 100 examples per task and
    iteration, shuffled). Returns the merged backbone's state, written by merge() from its strategy."""
    import lightning.pytorch as pl

    from lightning_merge.cli.demo import make_backbone, task_data
    from lightning_merge.tools.fw_merging import FWMerging

    heads = {task.name: head.requires_grad_(False) for task, head in zip(setup.tasks, setup.heads)}
    pl.seed_everything(seed, verbose=False)
    loaders = {task.name: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        *task_data(task, setup.splits["val"])), batch_size=examples, shuffle=True) for task in setup.tasks}
    fw = FWMerging(make_backbone(), setup.experts, setup.base, granularity=granularity, iterations=iterations,
                   step_size=step_size, logits_fn=lambda fw, task, batch: heads[task](fw(batch[0])))
    pl.Trainer(max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(fw, loaders)
    return merge(setup.experts, setup.base, fw.strategy())


FW_START = "task_arithmetic (λ 0.3: fw_merging's start)"
REGMEAN_PLUSPLUS = ("regmean++ (α 0.95)", "regmean++ (α on validation)", "regmean++ (α 0.95), λ on validation",
                    "regmean (α 0.95), Gram matrices of regmean++'s examples")


def regmean_plusplus_rows(setup, val, test, only: list[str] | None, examples: int = 512) -> dict:
    """RegMean++ on the digits experts (lightning_merge.tools.regmean_plusplus): each task's first ``examples``
    training examples (unshuffled, batches of 32; the capture's RegMean read 512 of a shuffled epoch), the second
    layer's Gram matrices read on the merged first layer. Rows as :func:`regmean_plusplus_rows_of`."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_merge.cli.demo import make_backbone, task_data

    loaders = [DataLoader(TensorDataset(*task_data(task, setup.splits["train"])), batch_size=32, shuffle=False)
               for task in setup.tasks]
    return regmean_plusplus_rows_of(make_backbone, setup.experts, loaders, setup.base, val, test, only, examples)


def regmean_plusplus_rows_of(make_model, experts: list[Expert], loaders: list, base: dict, val, test,
                             only: list[str] | None, examples: int, grid: tuple[float, ...] = GRID) -> dict:
    """The RegMean++ rows: α 0.95 (FusionBench's), α on validation (one pass per α: the Gram matrices depend on the
    merged earlier layers), λ along the α 0.95 merge on ``grid`` (an extension, as RegMean's), and the control:
    RegMean from the experts' own inputs on the same examples (compute_grams), so that the paired difference
    measures only whose inputs the Gram matrices are read on.

    Args:
        make_model: a fresh module of the experts' architecture, named like their tensors.
        experts: the experts; only the tensors they hold are merged (the model's others keep their values).
        loaders: each expert's task batches, in the experts' order.
        base: the base state dict, of the tensors the experts hold.
        val: ``state -> normalized validation score``, ``state`` holding the merged tensors (the base's where they
            are not merged); test: the same on test data.
        only: ``--only``.
        examples: the examples read from each loader.
        grid: the λ grid of the third row.
    """
    from lightning_merge.capture.grams import compute_grams
    from lightning_merge.tools.regmean_plusplus import regmean_plusplus

    chosen = [n for n in REGMEAN_PLUSPLUS if wanted(n, only)]
    if not chosen:
        return {}

    def full(state: dict) -> dict:  # the merged tensors over the base's others
        return {**base, **state}

    def own_model(expert: Expert):
        model = make_model()
        unexpected = model.load_state_dict(state_of(expert), strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"expert '{expert.name}' holds '{unexpected[0]}', which the model does not have")
        return model

    def run(alpha: float):
        return regmean_plusplus(make_model(), experts, loaders, base, alpha=alpha, num_examples=examples)

    rows: dict[str, tuple[float, float | None]] = {}
    published = run(0.95)
    if REGMEAN_PLUSPLUS[0] in chosen:
        rows[REGMEAN_PLUSPLUS[0]] = (test(full(published.state)), None)
    if REGMEAN_PLUSPLUS[1] in chosen:
        states = {a: full(run(a).state) for a in ALPHAS}
        best = max(states, key=lambda a: (val(states[a]), a))
        rows[REGMEAN_PLUSPLUS[1]] = (test(states[best]), best)
    if REGMEAN_PLUSPLUS[2] in chosen:
        result = sweep_scale(published.strategy, published.experts, base, lambda st: val(full(st)), grid)
        rows[REGMEAN_PLUSPLUS[2]] = (test(full(result.state)), result.scale)
    if REGMEAN_PLUSPLUS[3] in chosen:
        own = []
        for expert, loader in zip(experts, loaders):
            sums, counts, _ = compute_grams(own_model(expert), loader, num_examples=examples, names=expert.names())
            own.append(Expert(state_of(expert), statistics={"gram": {n: s / counts[n] for n, s in sums.items()}},
                              name=expert.name))
        rows[REGMEAN_PLUSPLUS[3]] = (test(full(merge(own, base, RegMean()))), None)
    return rows


def recompressed(experts: list[Expert], compression: str, folder: Path) -> list[Expert]:
    """The same experts with statistics written to a sidecar under ``compression`` and read back."""
    out = []
    for i, expert in enumerate(experts):
        stats = expert.statistics
        per_kind: dict = {}
        for key in stats.keys():
            kind, name = key.split("/", 1)
            per_kind.setdefault(kind, {})[name] = stats._tensors[key]
        path = write_statistics(
            folder / f"{compression}-{i}.statistics.safetensors", per_kind, stats.kinds, compression=compression
        )
        state = {f"backbone.{n}": expert.tensor(n) for n in expert.names()}
        out.append(Expert(state, prefix="backbone.", statistics=Statistics.load(path), name=expert.name))
    return out


def state_of(expert: Expert) -> dict:
    return {name: expert.tensor(name) for name in expert.names()}


def run_seed(seed: int, epochs: int, folder: Path, only: list[str] | None = None,
             steps: list[int] | None = None) -> dict[str, tuple[float, float | None]]:
    """One seed's rows; ``steps``: each expert's optimizer steps (rotated by the seed) instead of ``epochs``."""
    rotated = [steps[(t + seed) % len(steps)] for t in range(len(TASKS))] if steps else None
    setup = train_digits_experts(seed=seed, epochs=epochs, verbose=False, steps=rotated)
    own_val, own_test = setup.own_scores("val"), setup.own_scores("test")

    def val(state):
        return normalized_score(setup.scores(state, "val"), own_val)

    def test(state):
        return normalized_score(setup.scores(state, "test"), own_test)

    rows: dict[str, tuple[float, float | None]] = {"base (no merge)": (test(setup.base), None)}
    for name, strategy in strategies().items():
        if not wanted(name, only):
            continue
        state, chosen = tuned(strategy, setup.experts, setup.base, val)
        rows[name] = (test(state), chosen)
    for granularity in ("tensor", "block"):
        name = f"adamerging ({granularity}-wise, unlabeled validation inputs)"
        if wanted(name, only):
            rows[name] = (test(adamerging(setup, granularity, seed=seed)), None)
    for granularity, step_size in (("task", 0.1), ("layer", 0.1), ("task", 1.0), ("layer", 1.0)):
        steps = "" if step_size == 0.1 else f", step_size {step_size:g}"
        name = f"fw_merging (hard, {granularity}-wise{steps}, labelled validation)"
        if wanted(name, only):
            rows[name] = (test(fw_merging(setup, granularity, seed=seed, step_size=step_size)), None)
            rows[FW_START] = (test(merge(setup.experts, setup.base, TaskArithmetic(scale=0.3))), 0.3)
    rows.update(regmean_plusplus_rows(setup, val, test, only))
    if FUSION_BENCH is not None and wanted(FUSION_BENCH_ROW, only):
        reference = fusionbench_regmean(setup.experts, 0.95, folder)
        if isinstance(reference, str):  # digits' border pixels are never on: Σ G is singular for its inverse
            print(f"seed {seed}: FusionBench's RegMean merge failed: {reference}")
        else:
            rows[FUSION_BENCH_ROW] = (test(reference), None)
    if only:
        return rows
    for compression in ("bfloat16", "rank1"):
        experts = recompressed(setup.experts, compression, folder)
        for name, strategy in (("fisher (batch)", Fisher(estimator="batch")), ("ota", OTA())):
            result = sweep_scale(strategy, experts, setup.base, val, GRID)
            rows[f"{name}, {compression} stats"] = (test(result.state), result.scale)
    return rows


# -- MiniLM-L6 with LoRA experts on word-level tasks --------------------------------------------------------------
def minilm_setup(seed: int, epochs: int, rank: int = 8, cache: Path | None = None) -> types.SimpleNamespace:
    """The MiniLM benchmark's experts for one seed (trained, or read from ``cache``) and its scorer: a namespace
    with experts, base, heads, tasks, data, scores(state, split) -> {task: accuracy}, own_val, own_test, include."""
    import sys

    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import AutoModel, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    from _minilm import WORD_TASKS, minilm_path, split_words

    from lightning_merge.callbacks import CurvatureCapture
    from lightning_merge.cli.demo import quiet_lightning
    from lightning_merge.formats.lora import delta_precision, delta_weight, lora_scaling

    quiet_lightning()
    tok = AutoTokenizer.from_pretrained(minilm_path())
    base_model = AutoModel.from_pretrained(minilm_path())
    base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}

    def encode(words: list[str]) -> dict[str, torch.Tensor]:
        return dict(tok(words, padding="max_length", truncation=True, max_length=8, return_tensors="pt"))

    class WordClassifier(pl.LightningModule):
        def __init__(self, encoder: nn.Module, classes: int):
            super().__init__()
            self.encoder = encoder
            self.head = nn.Linear(384, classes)

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).float()
            return self.head((hidden * mask).sum(1) / mask.sum(1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(**x), y)

        def fisher_logits(self, batch):  # how the post-fit pass (here: the Gram matrices) runs a batch
            x, y = batch
            return self(**x), y

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-3)

    class Words(torch.utils.data.Dataset):
        def __init__(self, enc, labels):
            self.enc, self.labels = enc, torch.tensor(labels)

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {k: v[i] for k, v in self.enc.items()}, self.labels[i]

    tasks, experts, heads, data, statistics_of, factors_of = [], [], [], {}, [], []
    scaling = lora_scaling(2 * rank, rank)
    cached = cache / f"minilm-seed{seed}-epochs{epochs}-r{rank}.pt" if cache is not None else None
    saved = torch.load(cached, weights_only=True) if cached is not None and cached.exists() else None
    for t, (name, make) in enumerate(WORD_TASKS.items()):
        words, labels, classes = make(seed)
        split = split_words(words, labels, seed)
        data[name] = {k: (encode(w), torch.tensor(y)) for k, (w, y) in split.items()}
        if saved is not None:  # the same seed's experts, trained by an earlier run (--cache)
            e = saved["experts"][t]
            experts.append(Expert({**base_state, **e["adapted"]}, statistics=e["statistics"], name=name))
            head = nn.Linear(384, classes)
            head.load_state_dict(e["head"])
            heads.append(head.eval())
            tasks.append(name)
            factors_of.append(e.get("factors"))  # None in a cache written before the factors were kept
            continue
        torch.manual_seed(seed * 100 + t)
        encoder = get_peft_model(
            AutoModel.from_pretrained(minilm_path()),
            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], lora_dropout=0.0),
        )
        module = WordClassifier(encoder, classes)
        train_enc, train_y = data[name]["train"]
        loader = torch.utils.data.DataLoader(Words(train_enc, train_y.tolist()), batch_size=32, shuffle=True)
        gram_loader = torch.utils.data.DataLoader(Words(train_enc, train_y.tolist()), batch_size=32)
        capture = CurvatureCapture(checkpoint_sidecars=False, save_final=False, gram="after_fit",
                                   fisher_loader=gram_loader, fisher_examples=256)
        pl.seed_everything(seed + t, verbose=False)
        pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[capture],
        ).fit(module, loader)
        stats = capture.finalize()
        state = dict(base_state)
        fisher, moments, grams, factors = {}, {}, {}, {}
        for pname, _ in module.named_parameters():
            if not pname.endswith("lora_A.default.weight"):
                continue
            stem = pname[: -len(".lora_A.default.weight")]
            a_name, b_name = f"{stem}.lora_A.default.weight", f"{stem}.lora_B.default.weight"
            target = stem[len("encoder.base_model.model.") :] + ".weight"
            a, b = module.get_parameter(a_name).detach(), module.get_parameter(b_name).detach()
            factors[target] = (a.clone(), b.clone())
            state[target] = base_state[target] + delta_weight(a, b, scaling)
            fisher[target] = delta_precision(
                a, b, stats.get(a_name, "fisher", "batch"), stats.get(b_name, "fisher", "batch"), scaling
            )
            moments[target] = delta_precision(
                a, b, stats.get(a_name, "exp_avg_sq"), stats.get(b_name, "exp_avg_sq"), scaling
            )
            grams[target] = stats.get(a_name, "gram")  # lora_A's input is the adapted layer's
        statistics_of.append({"fisher.batch": fisher, "exp_avg_sq": moments, "gram": grams})
        factors_of.append(factors)
        experts.append(Expert(state, statistics=statistics_of[-1], name=name))
        heads.append(module.head.eval())
        tasks.append(name)
    if cached is not None and saved is None:
        cache.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".partial")
        torch.save({"experts": [
            {"adapted": {k: e.tensor(k) for k in grams}, "statistics": statistics_of[t], "head": heads[t].state_dict(),
             "factors": factors_of[t]}
            for t, e in enumerate(experts)]}, partial)
        partial.replace(cached)

    scorer = AutoModel.from_pretrained(minilm_path()).eval()

    @torch.no_grad()
    def scores(state: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        scorer.load_state_dict(state)
        out = {}
        for t, name in enumerate(tasks):
            enc, y = data[name][split]
            hidden = scorer(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pred = heads[t]((hidden * mask).sum(1) / mask.sum(1)).argmax(-1)
            out[name] = float((pred == y).float().mean())
        return out

    own_val = {n: scores(state_of(experts[t]), "val")[n] for t, n in enumerate(tasks)}
    own_test = {n: scores(state_of(experts[t]), "test")[n] for t, n in enumerate(tasks)}
    include = ["*.query.weight", "*.value.weight"]
    return types.SimpleNamespace(experts=experts, base=base_state, heads=heads, tasks=tasks, data=data,
                                 scores=scores, own_val=own_val, own_test=own_test, include=include,
                                 factors=factors_of, scaling=scaling)


def minilm_part(seed: int, epochs: int, rank: int = 8, only: list[str] | None = None,
                grid: tuple[float, ...] = GRID, cache: Path | None = None) -> dict[str, tuple[float, float | None]]:
    """Three LoRA experts (query/value of every layer, r = 8) on MiniLM-L6, each with its own head; merged in ΔW
    space (expert = θ₀ + s·B A on the adapted weights); curvature from the delta-method precision of ΔW. With
    ``cache``, a seed's trained experts are kept there and read back by later runs (training is most of a run)."""
    m = minilm_setup(seed, epochs, rank, cache)
    experts, base_state, scores, own_val, own_test = m.experts, m.base, m.scores, m.own_val, m.own_test
    include = m.include
    heads, tasks, data = m.heads, m.tasks, m.data
    rows: dict[str, tuple[float, float | None]] = {
        "base (no merge)": (normalized_score(scores(base_state, "test"), own_test), None)
    }
    for name, strategy in strategies().items():
        if isinstance(strategy, Fisher) and strategy.estimator == "example":
            continue  # no per-example Fisher captured for the adapters here
        if not wanted(name, only):
            continue
        state, chosen = tuned(strategy, experts, base_state, lambda st: normalized_score(scores(st, "val"), own_val),
                              grid=grid, include=include)
        rows[name] = (normalized_score(scores(state, "test"), own_test), chosen)
    if any(wanted(f"lora_lego (k {k})", only) for k in LEGO_RANKS):
        rows.update({n: v for n, v in lora_lego_rows(m, grid).items() if wanted(n, only)})
    rows.update(minilm_regmean_plusplus_rows(m, only, grid))
    if FUSION_BENCH is not None and wanted(FUSION_BENCH_ROW, only):
        import tempfile as _tempfile

        targets = [n for n in base_state if n.endswith((".query.weight", ".value.weight"))]
        with _tempfile.TemporaryDirectory() as tmp:
            reference = fusionbench_regmean(experts, 0.95, Path(tmp), base=base_state, names=targets)
        if isinstance(reference, str):
            print(f"seed {seed}: FusionBench's RegMean merge failed: {reference}")
        else:
            rows[FUSION_BENCH_ROW] = (normalized_score(scores(reference, "test"), own_test), None)
    if wanted("adamerging (tensor-wise, unlabeled validation inputs)", only):
        rows["adamerging (tensor-wise, unlabeled validation inputs)"] = (
            normalized_score(scores(minilm_adamerging(experts, base_state, heads, tasks, data, seed), "test"),
                             own_test), None)
    rows["(expert own-task accuracy)"] = (sum(own_test.values()) / len(own_test), None)
    return rows


LEGO_RANKS = (8, 16)  # the experts' rank r = 8, and 2r (of the 3r = 24 units per module)


def lora_lego_rows(m: types.SimpleNamespace, grid: tuple[float, ...]) -> dict[str, tuple[float, float | None]]:
    """LoRA-LEGO (lightning_merge.tools.lora_lego) on the experts' factors, merged rank k per module, seed 0, both
    reweightings; state = θ₀ + λ ΔW_LEGO with λ on validation over ``grid`` (like the strategies' λ)."""
    from lightning_merge.tools.lora_lego import lego_factors

    if any(f is None for f in m.factors):
        print("lora_lego: the cached experts have no factors (a cache written before they were kept); skipped")
        return {}
    rows: dict[str, tuple[float, float | None]] = {}
    val = lambda st: normalized_score(m.scores(st, "val"), m.own_val)  # noqa: E731
    for k in LEGO_RANKS:
        delta = {}
        for target in m.factors[0]:
            merged = lego_factors([(*f[target], m.scaling) for f in m.factors], k, seed=0,
                                  where=f"module '{target}'")
            delta[target] = merged.b @ merged.a
        states = {lam: {n: (v + lam * delta[n] if n in delta else v) for n, v in m.base.items()} for lam in grid}
        best = max(states, key=lambda lam: (val(states[lam]), -lam))
        rows[f"lora_lego (k {k})"] = (normalized_score(m.scores(states[best], "test"), m.own_test), best)
    return rows


def minilm_regmean_plusplus_rows(m: types.SimpleNamespace, only: list[str] | None,
                                 grid: tuple[float, ...]) -> dict[str, tuple[float, float | None]]:
    """RegMean++ on the MiniLM experts' adapted query/value weights (the tensors the other rows merge; the rest stay
    the base's): each task's first 256 training words, unshuffled, in batches of 32 (the examples the capture's
    Gram matrices were read on, and FusionBench's number), padded positions left out; rows as
    :func:`regmean_plusplus_rows_of`, λ on ``grid``."""
    import sys

    from transformers import AutoModel

    if not any(wanted(n, only) for n in REGMEAN_PLUSPLUS):
        return {}
    sys.path.insert(0, str(Path(__file__).parent))
    from _minilm import minilm_path

    targets = [n for n in m.base if n.endswith((".query.weight", ".value.weight"))]
    experts = [Expert({n: e.tensor(n) for n in targets}, name=e.name) for e in m.experts]
    base = {n: m.base[n] for n in targets}
    loaders = []
    for name in m.tasks:
        enc = m.data[name]["train"][0]
        words = {k: enc[k] for k in ("input_ids", "attention_mask")}
        count = len(words["input_ids"])
        loaders.append([{k: v[i : i + 32] for k, v in words.items()} for i in range(0, count, 32)])

    def make_model():
        return AutoModel.from_pretrained(minilm_path()).eval()

    return regmean_plusplus_rows_of(
        make_model, experts, loaders, base,
        lambda st: normalized_score(m.scores({**m.base, **st}, "val"), m.own_val),
        lambda st: normalized_score(m.scores({**m.base, **st}, "test"), m.own_test),
        only, examples=256, grid=grid)


class _EncodedInputs(torch.utils.data.Dataset):
    """Unlabeled tokenised inputs of every task at once: item i is ``{task: {input_ids, attention_mask}}``."""

    def __init__(self, inputs: dict[str, dict[str, torch.Tensor]]):
        self.inputs = inputs

    def __len__(self) -> int:
        return max(len(enc["input_ids"]) for enc in self.inputs.values())

    def __getitem__(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        return {task: {k: v[i % len(v)] for k, v in enc.items()} for task, enc in self.inputs.items()}


def minilm_adamerging(experts, base_state, heads, tasks, data, seed: int, steps: int = 1000) -> dict:
    """AdaMerging of the MiniLM LoRA experts: tensor-wise λ on the adapted query/value weights, learned on the
    tasks' validation words (labels unused), each task through its own head; FusionBench's settings."""
    import lightning.pytorch as pl
    from transformers import AutoModel

    from lightning_merge.tools.adamerging import AdaMerging

    sys_path = str(Path(__file__).parent)
    import sys

    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    from _minilm import minilm_path

    frozen = [h.requires_grad_(False) for h in heads]
    inputs = {name: {k: v for k, v in data[name]["val"][0].items() if k in ("input_ids", "attention_mask")}
              for name in tasks}

    def logits_fn(ada, batch):
        out = {}
        for t, name in enumerate(tasks):
            enc = batch[name]
            hidden = ada(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out[name] = frozen[t]((hidden * mask).sum(1) / mask.sum(1))
        return out

    ada = AdaMerging(AutoModel.from_pretrained(minilm_path()), experts, base_state, logits_fn=logits_fn,
                     include=r"\.(query|value)\.weight$")
    pl.seed_everything(seed, verbose=False)
    loader = torch.utils.data.DataLoader(_EncodedInputs(inputs), batch_size=16, shuffle=True)
    pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(ada, loader)
    return merge(experts, base_state, ada.strategy())


def report(title: str, per_seed: list[dict[str, tuple[float, float | None]]]) -> None:
    print(title)
    print(f"{'method':34s}{'normalized':>18s}   λ (LiNeS: β) per seed")
    for name in per_seed[0]:
        values = [100 * s[name][0] for s in per_seed]
        scales = [s[name][1] for s in per_seed]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lam = "" if scales[0] is None else ", ".join(x if isinstance(x, str) else f"{x:g}" for x in scales)
        print(f"{name:34s}{statistics.mean(values):11.1f} ± {std:4.1f}   {lam}")


PAIRS = (
    ("cabs 64:256", "ties (density 0.25)"),
    ("cabs 3:32", "ties (density 3/32)"),
    ("cabs 64:256", "magnitude 0.25, no election"),
    ("consensus (TA, k 2)", "task_arithmetic"),
    ("lines (task arithmetic)", "task_arithmetic"),
    ("lines (fisher)", "fisher (batch)"),
    ("dare p0.5 + fisher weights", "dare_ties (p 0.5)"),
    ("saliency 0.2 + ties election", "ties (density 0.2)"),
    ("ota, mean-normalized (reference option)", "ota"),
    ("ota (raw v)", "ota (bias-corrected v̂)"),
    ("ota + ffg 0.3 (raw v)", "ota + ffg 0.3 (bias-corrected v̂)"),
    ("fisher (batch), favor target (reference)", "fisher (batch)"),
    ("tsv_merge", "task_arithmetic"),
    ("lora_lego (k 8)", "task_arithmetic"),
    ("lora_lego (k 16)", "task_arithmetic"),
    ("lora_lego (k 8)", "ota"),
    ("lora_lego (k 8)", "tsv_merge"),
    ("lora_lego (k 16)", "tsv_merge"),
    ("tsv_merge", "lines (fisher)"),
    ("iso_c", "task_arithmetic"),
    ("iso_c", "tsv_merge"),
    ("iso_cts (f 0.8)", "task_arithmetic"),
    ("iso_cts (f 0.8)", "tsv_merge"),
    ("wudi (adam, 300 steps, lr 1e-5)", "task_arithmetic"),
    ("wudi (adam, 300 steps, lr 1e-5)", "tsv_merge"),
    ("wudi (exact optimum)", "task_arithmetic"),
    ("wudi (exact optimum)", "tsv_merge"),
    ("widen (ratio 1, calibration 1: the reference's)", "task_arithmetic"),
    ("widen (ratio 1, calibration 1: the reference's)", "tsv_merge"),
    ("widen, calibration off (ratio 3)", "task_arithmetic"),
    ("widen, calibration off (ratio 3)", "tsv_merge"),
    ("doge_ta (lamda 0.07, as published)", "task_arithmetic"),
    ("doge_ta (lamda 0.07, as published)", "tsv_merge"),
    ("doge_ta, lamda on validation", "task_arithmetic"),
    ("doge_ta, lamda on validation", "tsv_merge"),
    ("doge_ta, others mean, lamda on validation", "task_arithmetic"),
    ("doge_ta, others mean, lamda on validation", "tsv_merge"),
    *((f"tsv_merge, {v}", b) for v in ("gram metric (α 0.95, δ 0.01)", "gram metric, δ on validation",
                                      "gram metric, δ 0.3–10 on validation",
                                      "exp_avg_sq metric, δ 0.3–10 on validation",
                                      "fisher (batch) metric", "exp_avg_sq metric", "fisher (batch) mask 0.3",
                                      "fisher (batch) mask, density on validation",
                                      "gram metric + fisher (batch) mask 0.3")
      for b in ("tsv_merge", "regmean (α on validation)", "regmean (α 0.95), λ on validation")),
    *((f"cat_merging{v}", b) for v in (" (as published: lambd 5, ratio 4, scale 0.4)", ", scale on validation",
                                         ", lambd and ratio on validation")
      for b in ("task_arithmetic", "tsv_merge", "regmean (α 0.95)")),
    ("pcb (ratio 0.1)", "task_arithmetic"),
    ("pcb (ratio 0.1)", "ties (density 0.2)"),
    ("pcb (ratio 0.2)", "ties (density 0.2)"),
    ("regmean (α 0.95)", "task_arithmetic"),
    ("regmean (α on validation)", "task_arithmetic"),
    ("regmean (α on validation)", "fisher (batch)"),
    ("regmean (α 0.95), λ on validation", "task_arithmetic"),
    ("regmean (α 0.95), λ on validation", "ota"),
    ("regmean (α 0.95)", "regmean, FusionBench's merge on the same Gram matrices (α 0.95)"),
    ("regmean++ (α 0.95)", "regmean (α 0.95)"),
    ("regmean++ (α 0.95)", "regmean (α 0.95), Gram matrices of regmean++'s examples"),
    ("regmean++ (α 0.95)", "task_arithmetic"),
    ("regmean++ (α on validation)", "regmean (α on validation)"),
    ("regmean++ (α on validation)", "task_arithmetic"),
    ("regmean++ (α 0.95), λ on validation", "regmean (α 0.95), λ on validation"),
    ("regmean++ (α 0.95), λ on validation", "task_arithmetic"),
    ("regmean++ (α 0.95)", "tsv_merge"),
    ("regmean++ (α on validation)", "tsv_merge"),
    ("regmean++ (α 0.95), λ on validation", "tsv_merge"),
    ("adamerging (tensor-wise, unlabeled validation inputs)", "task_arithmetic"),
    ("adamerging (block-wise, unlabeled validation inputs)", "task_arithmetic"),
    ("adamerging (tensor-wise, unlabeled validation inputs)", "ota"),
    ("fw_merging (hard, task-wise, labelled validation)", FW_START),
    ("fw_merging (hard, layer-wise, labelled validation)", FW_START),
    ("fw_merging (hard, task-wise, step_size 1, labelled validation)", FW_START),
    ("fw_merging (hard, layer-wise, step_size 1, labelled validation)", FW_START),
    ("fw_merging (hard, task-wise, step_size 1, labelled validation)", "task_arithmetic"),
    ("fw_merging (hard, layer-wise, step_size 1, labelled validation)", "task_arithmetic"),
    ("fw_merging (hard, task-wise, labelled validation)", "task_arithmetic"),
    ("fw_merging (hard, layer-wise, labelled validation)", "task_arithmetic"),
    ("fw_merging (hard, task-wise, labelled validation)", "adamerging (tensor-wise, unlabeled validation inputs)"),
    ("ota, power on validation", "ota"),
    ("ota, per-expert weights on validation", "ota"),
)


def report_pairs(per_seed: list[dict[str, tuple[float, float | None]]]) -> None:
    """Paired differences (same seed, same experts): mean ± std and wins per pair."""
    print("paired differences (a − b, normalized points; wins of a over seeds)")
    for a, b in PAIRS:
        if a not in per_seed[0] or b not in per_seed[0]:
            continue
        diffs = [100 * (s[a][0] - s[b][0]) for s in per_seed]
        std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        wins = sum(d > 0 for d in diffs)
        print(f"  {a + ' − ' + b:60s}{statistics.mean(diffs):+6.1f} ± {std:3.1f}   {wins}/{len(diffs)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="the first seed (seeds first..first+seeds-1): a stopped run goes on where it ended")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--part", choices=["digits", "minilm", "all"], default="all")
    parser.add_argument("--minilm-epochs", type=int, default=2)
    parser.add_argument("--wide-grid", action="store_true", help="MiniLM: sweep λ up to 3.5 instead of 2.5")
    parser.add_argument("--cache", type=Path, default=None,
                        help="MiniLM: keep each seed's trained experts in this folder and reuse them in later runs")
    parser.add_argument("--steps", type=lambda text: [int(x) for x in text.split(",")], default=None,
                        help="digits: fine-tune the experts for these numbers of optimizer steps (comma-separated, "
                             "rotated by the seed) instead of --epochs")
    parser.add_argument("--only", nargs="*", default=None,
                        help="only the strategies whose row name contains one of these, or is exactly X for =X "
                             "(digits: no compression rows)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.part in ("minilm", "all"):
        runs = []
        # each seed's rows as it ends: a run stopped early keeps what finished (and --first-seed goes on from there)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            runs.append(minilm_part(seed, args.minilm_epochs, only=args.only,
                                    grid=WIDE_GRID if args.wide_grid else GRID, cache=args.cache))
            report(f"MiniLM seed {seed} ({time.perf_counter() - started:.0f}s so far)", runs[-1:])
            print(flush=True)
        report(f"MiniLM-L6, LoRA r=8 on query/value, 3 word tasks, {args.seeds} seeds: normalized test accuracy", runs)
        report_pairs(runs)
        print(f"total {time.perf_counter() - started:.0f}s\n")
        if args.part == "minilm":
            return
    per_seed = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            per_seed.append(run_seed(seed, args.epochs, Path(tmp), args.only, args.steps))
    lengths = f"experts fine-tuned for {'/'.join(map(str, args.steps))} steps, " if args.steps else ""
    report(
        f"digits, 4 tasks, {lengths}{args.seeds} seeds: normalized test accuracy (mean ± std), λ chosen on validation",
        per_seed,
    )
    report_pairs(per_seed)
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
