"""Merge quality on real data that ships offline: normalized accuracy of every strategy, λ chosen on validation.

Digits (scikit-learn): a backbone pre-trained briefly on 10-way digits; four experts fine-tuned with Lightning and
CurvatureCapture on different tasks (label functions and input transforms), each with its own head; backbones
merged; per-task accuracy with each expert's head; normalized = merged ÷ expert, averaged over tasks. Mean ± std
over seeds. Also: each statistics compression (float32, bfloat16, rank-1) through a real sidecar round trip.

    python benchmarks/merge_quality.py [--seeds 3] [--epochs 12]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from lightning_merge import (
    OTA,
    PCB,
    Breadcrumbs,
    Cabs,
    Consensus,
    Dare,
    Expert,
    Fisher,
    Generalized,
    Linear,
    LiNeS,
    TaskArithmetic,
    Ties,
    TSVMerge,
    WeightedMedian,
    merge,
)
from lightning_merge.demo import train_digits_experts
from lightning_merge.evaluation import normalized_score, sweep_scale
from lightning_merge.stats import Statistics, write_statistics

GRID = (0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0, 2.5)


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
        "weighted_median (batch)": WeightedMedian(estimator="batch"),
        "tsv_merge": TSVMerge(),
        "pcb (ratio 0.1)": PCB(ratio=0.1),
        "pcb (ratio 0.2)": PCB(ratio=0.2),
        # the references' conventions (docs/strategies.md): OTA's per-tensor mean normalisation, Fisher's floor on
        # the target (first) model only
        "ota, mean-normalized (reference)": OTA(mean_normalize=True),
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
    }


BETAS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


def tuned(strategy, experts, base, score, **merge_kwargs):
    """(state, chosen value): λ swept for strategies with a scale; LiNeS' β swept (α from its norm rule)."""
    if isinstance(strategy, LiNeS):
        states = {b: merge(experts, base, dataclasses.replace(strategy, beta=b), **merge_kwargs) for b in BETAS}
        best = max(states, key=lambda b: (score(states[b]), -b))
        return states[best], best
    if hasattr(strategy, "scale"):
        result = sweep_scale(strategy, experts, base, score, GRID, **merge_kwargs)
        return result.state, result.scale
    return merge(experts, base, strategy, **merge_kwargs), None


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


def run_seed(seed: int, epochs: int, folder: Path,
             only: list[str] | None = None) -> dict[str, tuple[float, float | None]]:
    setup = train_digits_experts(seed=seed, epochs=epochs, verbose=False)
    own_val, own_test = setup.own_scores("val"), setup.own_scores("test")

    def val(state):
        return normalized_score(setup.scores(state, "val"), own_val)

    def test(state):
        return normalized_score(setup.scores(state, "test"), own_test)

    rows: dict[str, tuple[float, float | None]] = {"base (no merge)": (test(setup.base), None)}
    for name, strategy in strategies().items():
        if only and not any(o in name for o in only):
            continue
        state, chosen = tuned(strategy, setup.experts, setup.base, val)
        rows[name] = (test(state), chosen)
    if only:
        return rows
    for compression in ("bfloat16", "rank1"):
        experts = recompressed(setup.experts, compression, folder)
        for name, strategy in (("fisher (batch)", Fisher(estimator="batch")), ("ota", OTA())):
            result = sweep_scale(strategy, experts, setup.base, val, GRID)
            rows[f"{name}, {compression} stats"] = (test(result.state), result.scale)
    return rows


# -- MiniLM-L6 with LoRA experts on word-level tasks --------------------------------------------------------------
def minilm_part(seed: int, epochs: int, rank: int = 8) -> dict[str, tuple[float, float | None]]:
    """Three LoRA experts (query/value of every layer, r = 8) on MiniLM-L6, each with its own head; merged in ΔW
    space (expert = θ₀ + s·B A on the adapted weights); curvature from the delta-method precision of ΔW."""
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
    from lightning_merge.demo import quiet_lightning
    from lightning_merge.lora import delta_precision, delta_weight, lora_scaling

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

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-3)

    class Words(torch.utils.data.Dataset):
        def __init__(self, enc, labels):
            self.enc, self.labels = enc, torch.tensor(labels)

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {k: v[i] for k, v in self.enc.items()}, self.labels[i]

    tasks, experts, heads, data = [], [], [], {}
    scaling = lora_scaling(2 * rank, rank)
    for t, (name, make) in enumerate(WORD_TASKS.items()):
        words, labels, classes = make(seed)
        split = split_words(words, labels, seed)
        data[name] = {k: (encode(w), torch.tensor(y)) for k, (w, y) in split.items()}
        torch.manual_seed(seed * 100 + t)
        encoder = get_peft_model(
            AutoModel.from_pretrained(minilm_path()),
            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], lora_dropout=0.0),
        )
        module = WordClassifier(encoder, classes)
        capture = CurvatureCapture(checkpoint_sidecars=False, save_final=False)
        train_enc, train_y = data[name]["train"]
        loader = torch.utils.data.DataLoader(Words(train_enc, train_y.tolist()), batch_size=32, shuffle=True)
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
        fisher, moments = {}, {}
        for pname, _ in module.named_parameters():
            if not pname.endswith("lora_A.default.weight"):
                continue
            stem = pname[: -len(".lora_A.default.weight")]
            a_name, b_name = f"{stem}.lora_A.default.weight", f"{stem}.lora_B.default.weight"
            target = stem[len("encoder.base_model.model.") :] + ".weight"
            a, b = module.get_parameter(a_name).detach(), module.get_parameter(b_name).detach()
            state[target] = base_state[target] + delta_weight(a, b, scaling)
            fisher[target] = delta_precision(
                a, b, stats.get(a_name, "fisher", "batch"), stats.get(b_name, "fisher", "batch"), scaling
            )
            moments[target] = delta_precision(
                a, b, stats.get(a_name, "exp_avg_sq"), stats.get(b_name, "exp_avg_sq"), scaling
            )
        experts.append(Expert(state, statistics={"fisher.batch": fisher, "exp_avg_sq": moments}, name=name))
        heads.append(module.head.eval())
        tasks.append(name)

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
    rows: dict[str, tuple[float, float | None]] = {
        "base (no merge)": (normalized_score(scores(base_state, "test"), own_test), None)
    }
    for name, strategy in strategies().items():
        if isinstance(strategy, Fisher) and strategy.estimator == "example":
            continue  # no per-example Fisher captured for the adapters here
        state, chosen = tuned(strategy, experts, base_state, lambda st: normalized_score(scores(st, "val"), own_val),
                              include=include)
        rows[name] = (normalized_score(scores(state, "test"), own_test), chosen)
    rows["(expert own-task accuracy)"] = (sum(own_test.values()) / len(own_test), None)
    return rows


def report(title: str, per_seed: list[dict[str, tuple[float, float | None]]]) -> None:
    print(title)
    print(f"{'method':34s}{'normalized':>18s}   λ (LiNeS: β) per seed")
    for name in per_seed[0]:
        values = [100 * s[name][0] for s in per_seed]
        scales = [s[name][1] for s in per_seed]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lam = "" if scales[0] is None else ", ".join(f"{x:g}" for x in scales)
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
    ("ota, mean-normalized (reference)", "ota"),
    ("fisher (batch), favor target (reference)", "fisher (batch)"),
    ("tsv_merge", "task_arithmetic"),
    ("tsv_merge", "lines (fisher)"),
    ("pcb (ratio 0.1)", "task_arithmetic"),
    ("pcb (ratio 0.1)", "ties (density 0.2)"),
    ("pcb (ratio 0.2)", "ties (density 0.2)"),
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
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--part", choices=["digits", "minilm", "all"], default="all")
    parser.add_argument("--minilm-epochs", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None,
                        help="digits: only the strategies whose row name contains one of these (no compression rows)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.part in ("minilm", "all"):
        runs = [minilm_part(seed, args.minilm_epochs) for seed in range(args.seeds)]
        report(f"MiniLM-L6, LoRA r=8 on query/value, 3 word tasks, {args.seeds} seeds: normalized test accuracy", runs)
        report_pairs(runs)
        print(f"total {time.perf_counter() - started:.0f}s\n")
        if args.part == "minilm":
            return
    per_seed = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            per_seed.append(run_seed(seed, args.epochs, Path(tmp), args.only))
    report(
        f"digits, 4 tasks, {args.seeds} seeds: normalized test accuracy (mean ± std), λ chosen on validation", per_seed
    )
    report_pairs(per_seed)
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
