"""Merge quality on the LLM fine-tuning path: a small Llama-architecture causal LM, LoRA experts, a bf16 base,
Hugging Face's token-mean loss, CurvatureCapture on.

Offline text, byte-level tokens (vocabulary 256 + BOS):

- ``code``: Python standard-library source files;
- ``english``: English prose, the Python language reference shipped in ``pydoc_data``;
- ``spanish`` / ``german``: text sampled word by word from wordfreq's frequency lists (lexical statistics of the
  language, no grammar).

A base is trained briefly from scratch on a mix of all four (then stored in bf16); one LoRA expert per domain is
fine-tuned on its domain with Lightning and ``CurvatureCapture`` (each domain has its own sequence length, so the
token-aware batch Fisher matters); the adapters are merged with every strategy, λ (and LiNeS' β) chosen on each
domain's validation loss; merged models are scored by test perplexity against each domain's expert. Normalized =
mean over domains of expert perplexity ÷ merged perplexity (1 = as good as each expert on its own domain). Mean ± std
over seeds, and paired differences against tuned task arithmetic. Also: the capture's step-time overhead.

    python benchmarks/causal_lm.py [--seeds 3] [--out benchmarks/_work/causal_lm.json]
    python benchmarks/causal_lm.py --overhead [--rounds 7]     # the capture's step-time overhead only
    python benchmarks/causal_lm.py --summarize a.json b.json   # one table over the seeds of several runs
    python benchmarks/causal_lm.py --cache DIR --only iso regmean # keeps each seed's base and adapters in DIR; a
                                                                  # later run with the same DIR merges them again
                                                                  # without training (the same rows: CPU training
                                                                  # is deterministic)
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import math
import os
import random
import shutil
import statistics
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_merge import (
    OPCM,
    OTA,
    WIDEN,
    WUDI,
    Breadcrumbs,
    Cabs,
    CATMerging,
    Consensus,
    Dare,
    DogeTA,
    Fisher,
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
    quadratic_coefficients,
)
from lightning_merge.callbacks import CurvatureCapture
from lightning_merge.tools.evaluation import sweep, sweep_scale

DOMAINS = {"code": 128, "english": 96, "spanish": 64, "german": 48}  # domain → sequence length (tokens)
VOCAB = 257  # bytes + BOS
BOS = 256
GRID = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0)
#: ISO-C and ISO-CTS flatten the summed spectrum and want larger λ (on digits they sat at the top of 0.3-2.5)
ISO_GRID = (*GRID, 2.5, 3.0, 4.0, 5.0, 6.0)
BETAS = (0.0, 0.5, 1.0, 2.0)
ALPHAS = (0.0, 0.5, 0.9, 0.95, 1.0)  # RegMean's α, chosen on validation for "regmean (α on validation)"
UNSWEPT = {"regmean (α 0.95)", "cat_merging (as published: lambd 5, ratio 4, scale 0.4)"}  # as published


def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# -- offline text ---------------------------------------------------------------------------------------------------


def domain_text(domain: str, seed: int, size: int = 600_000) -> bytes:
    rng = random.Random(seed)
    if domain == "code":
        files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))
        rng.shuffle(files)
        parts, total = [], 0
        for f in files:
            data = Path(f).read_bytes()
            parts.append(data)
            total += len(data)
            if total > size:
                break
        return b"\n".join(parts)[:size]
    if domain == "english":
        import pydoc_data.topics as topics

        texts = [topics.topics[k] for k in sorted(topics.topics)]
        rng.shuffle(texts)
        return "\n\n".join(texts).encode("utf-8")[:size]
    import wordfreq

    lang = {"spanish": "es", "german": "de"}[domain]
    words = wordfreq.top_n_list(lang, 5000)
    weights = [wordfreq.word_frequency(w, lang) for w in words]
    out, total = [], 0
    while total < size:
        sentence = rng.choices(words, weights, k=rng.randint(6, 18))
        line = " ".join(sentence).capitalize() + rng.choice([". ", ", ", "? ", "! "])
        out.append(line)
        total += len(line.encode("utf-8"))
    return "".join(out).encode("utf-8")[:size]


@dataclasses.dataclass
class Domain:
    name: str
    length: int
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def make_domains(seed: int) -> dict[str, Domain]:
    out = {}
    for name, length in DOMAINS.items():
        data = torch.tensor(list(domain_text(name, seed)), dtype=torch.long)
        n = data.numel() // (length - 1)
        seqs = data[: n * (length - 1)].view(n, length - 1)
        seqs = torch.cat([torch.full((n, 1), BOS), seqs], 1)
        g = torch.Generator().manual_seed(seed)
        seqs = seqs[torch.randperm(n, generator=g)]
        out[name] = Domain(name, length, seqs[:-128], seqs[-128:-64], seqs[-64:])
    return out


# -- model ---------------------------------------------------------------------------------------------------------


def config():
    import transformers

    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    tie_word_embeddings=False)


class LM(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, lr: float):
        super().__init__()
        self.model = model
        self.lr = lr

    def forward(self, **inputs):
        return self.model(**inputs)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0)


def loader(seqs: torch.Tensor, batch_size: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, seqs.shape[0], (steps, batch_size), generator=g)
    return [{"input_ids": seqs[i], "labels": seqs[i]} for i in idx]


class _List(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def fit(module: LM, batches: list, callbacks: list, root: Path) -> pl.Trainer:
    data = torch.utils.data.DataLoader(_List(batches), batch_size=None, shuffle=False)
    trainer = pl.Trainer(default_root_dir=str(root), max_epochs=1, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=callbacks)
    trainer.fit(module, data)
    return trainer


@torch.no_grad()
def loss_of(model: torch.nn.Module, seqs: torch.Tensor, batch_size: int = 32) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, seqs.shape[0], batch_size):
        batch = seqs[i: i + batch_size]
        logits = model(input_ids=batch).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch[:, 1:, None]).squeeze(-1)
        total += float(-lp.sum())
        count += lp.numel()
    return total / count


def load(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    import transformers

    model = transformers.LlamaForCausalLM(config()).to(torch.bfloat16)
    model.load_state_dict(state, strict=True)
    return model


class StepTimer(pl.Callback):
    def __init__(self):
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t)


# -- one seed ----------------------------------------------------------------------------------------------------


def strategies() -> dict[str, object]:
    return {
        "average": Linear(),
        "task_arithmetic": TaskArithmetic(),
        "ties (0.2)": Ties(density=0.2),
        "dare_ties (p 0.5)": Dare(drop_rate=0.5, combine="ties"),
        "breadcrumbs": Breadcrumbs(density=0.9, gamma=0.01),
        "cabs 64:256": Cabs(n=64, m=256),
        "consensus": Consensus(),
        "fisher (batch)": Fisher(estimator="batch"),
        "fisher (batch, no norm)": Fisher(estimator="batch", normalize=False),
        "fisher (per-example)": Fisher(estimator="example"),
        "ota": OTA(),
        "ota + ffg (0.3)": OTA(density=0.3),
        "weighted_median": WeightedMedian(estimator="batch"),
        "opcm": OPCM(),
        "lines(task arithmetic)": LiNeS(TaskArithmetic()),
        "tsv_merge": TSVMerge(),
        # issue 33: TSV-M with Fisher saliency masks before the SVD, and in the metric of the captured curvature
        "tsv_merge, fisher (batch) mask 0.3": TSVMerge(mask="fisher.batch", density=0.3),
        "tsv_merge, fisher (batch) mask 0.5": TSVMerge(mask="fisher.batch", density=0.5),
        "tsv_merge, gram metric (δ 1)": TSVMerge(metric="gram", damping=1.0),
        # the references' options (docs/strategies.md): OTA's per-tensor mean normalisation (`normalise: global`,
        # not the reference's default, which is OTA()), Fisher's floor on the target (first) model only
        "ota, mean-normalized (reference option)": OTA(mean_normalize=True),
        "fisher (batch), favor_target (reference)": Fisher(estimator="batch", favor_target=True),
        # from the input Gram matrices the experts capture after the fit (CurvatureCapture(gram="after_fit"))
        "regmean (α 0.95)": RegMean(),
        "regmean (α on validation)": RegMean(alpha=1.0),
        "regmean (α 0.95), λ on validation": RegMean(),  # an extension: θ₀ + λ·τ*
        "regmean, α and λ on validation": RegMean(),  # both, jointly (lightning_merge.sweep)
        # issue 33's data-free subspace methods (λ on validation; ISO on ISO_GRID)
        "iso_c": IsoC(),
        "iso_cts (f 0.8)": IsoCTS(),
        "wudi (adam, 300 steps, lr 1e-5)": WUDI(),
        "wudi (exact optimum)": WUDI(solver="exact"),
        # issue 33: WIDEN (the authors' widen_merging), their defaults and with calibration off
        "widen (ratio 1, calibration 1: the reference's)": WIDEN(),
        "widen, calibration off (ratio 3)": WIDEN(above_average_value_ratio=3.0),
        # issue 33: CAT Merging from the captured Gram matrices, as published (lambd 5, ratio 4, scale 0.4) and with
        # its scale on validation
        "cat_merging (as published: lambd 5, ratio 4, scale 0.4)": CATMerging(),
        "cat_merging, scale on validation": CATMerging(),
    }


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(values: list[float]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(values), dtype=torch.float64)
        for v in t.unique():
            tied = t == v
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx @ ry) / (rx.norm() * ry.norm()))


REGMEAN_PLUSPLUS = ("regmean++ (α 0.95)", "regmean++ (α on validation)", "regmean++ (α 0.95), λ on validation",
                    "regmean++, α and λ on validation")


def regmean_plusplus_rows(experts: list, base: Path, domains: dict, seed: int, val_score, normalized,
                          only: list[str] | None) -> dict:
    """RegMean++ (lightning_merge.tools.regmean_plusplus) on the LoRA experts read as θ₀ + ΔW: each domain's Gram
    matrices read on the model whose earlier decoder layers are merged, from the same 256 training sequences the
    capture's RegMean read (the post-fit loader), with the model in float32 for the pass. α 0.95, α on validation
    (one pass per α), λ along the α 0.95 merge (an extension), and α with λ jointly (λ along each α's merge)."""
    import transformers

    from lightning_merge.tools.regmean_plusplus import regmean_plusplus

    wanted = [n for n in REGMEAN_PLUSPLUS if not only or any(o in n for o in only)]
    rows: dict = {}
    names = list(domains)

    def row(label: str, state: dict, chosen: dict, t0: float) -> None:
        model = load({k: v.to(torch.bfloat16) for k, v in state.items()})
        losses = {n: loss_of(model, domains[n].test) for n in names}
        rows[label] = {"normalized": normalized(losses), "perplexity": {n: math.exp(v) for n, v in losses.items()},
                       **chosen, "seconds": time.perf_counter() - t0}
        print(f"  seed {seed} {label:<26} normalized {100 * rows[label]['normalized']:.1f}  {chosen}", flush=True)

    passes: dict = {}

    def run(alpha: float):  # one pass per α, shared by the rows
        if alpha not in passes:
            model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
            loaders = [loader(d.train, 8, 32, seed + 7) for d in domains.values()]  # the capture's post-fit batches
            passes[alpha] = regmean_plusplus(model, experts, loaders, base, alpha=alpha, num_examples=256)
        return passes[alpha]

    if not wanted:
        return rows
    t0 = time.perf_counter()
    published = run(0.95)
    if REGMEAN_PLUSPLUS[0] in wanted:
        row(REGMEAN_PLUSPLUS[0], published.state, {}, t0)
    if REGMEAN_PLUSPLUS[1] in wanted:
        t0 = time.perf_counter()
        best = None
        for alpha in ALPHAS:
            state = run(alpha).state
            score = val_score(state)
            if best is None or score > best[0]:
                best = (score, state, alpha)
        row(REGMEAN_PLUSPLUS[1], best[1], {"alpha": best[2]}, t0)
    if REGMEAN_PLUSPLUS[2] in wanted:
        t0 = time.perf_counter()
        result = sweep_scale(published.strategy, published.experts, base, val_score, GRID)
        row(REGMEAN_PLUSPLUS[2], result.state, {"scale": result.scale}, t0)
    if REGMEAN_PLUSPLUS[3] in wanted:
        t0 = time.perf_counter()
        best = None
        for alpha in ALPHAS:
            result = sweep_scale(run(alpha).strategy, run(alpha).experts, base, val_score, GRID)
            if best is None or result.score > best[0]:
                best = (result.score, result.state, {"alpha": alpha, "scale": result.scale})
        row(REGMEAN_PLUSPLUS[3], best[1], best[2], t0)
    return rows


def selected(label: str, only: list[str] | None) -> bool:
    return not only or any(o in label for o in only)


def test_row(state: dict, domains: dict, normalized, chosen: dict, t0: float) -> dict:
    model = load({k: v.to(torch.bfloat16) for k, v in state.items()})
    losses = {n: loss_of(model, d.test) for n, d in domains.items()}
    return {"normalized": normalized(losses), "perplexity": {n: math.exp(v) for n, v in losses.items()}, **chosen,
            "seconds": time.perf_counter() - t0}


#: DOGE-TA's numerator λᵢ = lamda/‖τᵢ‖ per tensor (the reference's 0.07 is for CLIP ViT-B/32); it has no scale of
#: its own, so its lamda is what validation chooses
DOGE_LAMDAS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5)
DOGE = ("doge_ta (lamda 0.07, as published)", "doge_ta, lamda on validation",
        "doge_ta, others mean, lamda on validation")


def doge_rows(experts: list, base: Path, domains: dict, seed: int, val_score, normalized,
              only: list[str] | None) -> dict:
    """DOGE-TA (FusionBench's doge_ta) on the LoRA experts: as published (lamda 0.07, density 0.3, 400 Adam steps
    per tensor), and with its lamda chosen on validation; the last with the non-optimised tensors (none differ
    here: every adapted tensor is 2-D) at the mean task vector."""
    rows: dict = {}
    for label, strategy, lamdas in ((DOGE[0], DogeTA(), (0.07,)), (DOGE[1], DogeTA(), DOGE_LAMDAS),
                                    (DOGE[2], DogeTA(others="mean"), DOGE_LAMDAS)):
        if not selected(label, only):
            continue
        t0 = time.perf_counter()
        best = None
        for lamda in lamdas:
            state = merge(experts, base, dataclasses.replace(strategy, lamda=lamda))
            score = val_score(state) if len(lamdas) > 1 else 0.0
            if best is None or score > best[0]:
                best = (score, state, lamda)
        rows[label] = test_row(best[1], domains, normalized, {"lamda": best[2]} if len(lamdas) > 1 else {}, t0)
        print(f"  seed {seed} {label:<26} normalized {100 * rows[label]['normalized']:.1f}  lamda {best[2]}",
              flush=True)
    return rows


FW = ("fw_merging (hard, task-wise, validation text)", "fw_merging (hard, layer-wise, validation text)")


def fw_rows(experts: list, base: Path, domains: dict, seed: int, normalized, only: list[str] | None) -> dict:
    """FW-Merging (hard; lightning_merge.tools.fw_merging) over the four adapters read as θ₀ + ΔW: FusionBench's
    defaults (10 iterations, step_size 0.1, scaling_factor 0.3, from task arithmetic at 0.3), the gradient of each
    domain's next-token cross-entropy on a shuffled batch of 16 of its validation sequences per iteration (the
    model in float32 for the pass)."""
    import transformers

    from lightning_merge.tools.fw_merging import FWMerging

    rows: dict = {}
    for label, granularity in zip(FW, ("task", "layer")):
        if not selected(label, only):
            continue
        t0 = time.perf_counter()
        pl.seed_everything(seed, verbose=False)
        loaders = {name: torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(d.val, d.val[:, 1:]), batch_size=16, shuffle=True)
            for name, d in domains.items()}
        model = transformers.LlamaForCausalLM(config())
        fw = FWMerging(model, experts, base, granularity=granularity,
                       logits_fn=lambda fw, task, batch: fw(input_ids=batch[0]).logits[:, :-1])
        pl.Trainer(max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False).fit(fw, loaders)
        rows[label] = test_row(merge(experts, base, fw.strategy()), domains, normalized, {}, t0)
        print(f"  seed {seed} {label:<26} normalized {100 * rows[label]['normalized']:.1f}", flush=True)
    return rows


def run_seed(seed: int, root: Path, pretrain_steps: int, expert_steps: int, only: list[str] | None = None,
             quadratic: bool = False) -> dict:
    import peft
    import transformers

    torch.manual_seed(seed)
    domains = make_domains(seed)
    started = time.perf_counter()
    # with --cache, a seed's base, adapters and expert losses are kept (root is then the cache's seed folder) and a
    # later run merges them again without training. Each stage (the base, each expert) is kept as it finishes, with
    # the global RNG state after it, so a stopped run goes on from the last finished stage and trains exactly what
    # an uninterrupted run would (CPU training is deterministic; the rows are the same)
    trained = root / "trained.json"
    cached = json.loads(trained.read_text()) if trained.is_file() else None
    pretrained = root / "base" / "rng_after.pt"
    if cached is None and pretrained.is_file():
        torch.set_rng_state(torch.load(pretrained, weights_only=True))
    elif cached is None:
        # the base: from scratch on a mix of every domain
        base_model = transformers.LlamaForCausalLM(config())
        mixed = []
        per = pretrain_steps // len(domains)
        for k, d in enumerate(domains.values()):
            mixed += loader(d.train, 16, per, seed * 100 + k)
        random.Random(seed).shuffle(mixed)
        fit(LM(base_model, 3e-3), mixed, [], root / "pretrain")
        base_model.to(torch.bfloat16).save_pretrained(root / "base")
        torch.save(torch.get_rng_state(), pretrained)
    base_time = time.perf_counter() - started
    # one LoRA expert per domain, CurvatureCapture on
    adapters, expert_loss = {}, {}
    step_bare = step_captured = float("nan")
    for k, d in enumerate(domains.values()):
        adapters[d.name] = root / d.name / "final.adapter"
        if cached is not None:
            expert_loss[d.name] = cached["expert_loss"][d.name]
            step_bare, step_captured = cached["step_bare"], cached["step_captured"]
            continue
        stage = root / d.name / "expert.json"
        if stage.is_file():
            kept = json.loads(stage.read_text())
            expert_loss[d.name] = kept["loss"]
            step_bare, step_captured = kept.get("step_bare", step_bare), kept.get("step_captured", step_captured)
            torch.set_rng_state(torch.load(root / d.name / "rng_after.pt", weights_only=True))
            continue
        if (root / d.name).exists():  # a fit stopped part-way: start this expert again
            shutil.rmtree(root / d.name)
        model = peft.get_peft_model(
            transformers.LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16),
            peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"], lora_dropout=0.0))
        timer = StepTimer()
        capture = CurvatureCapture(fisher_after_fit="example", fisher_loader=loader(d.train, 8, 32, seed + 7),
                                   fisher_examples=256, gram="after_fit", dirpath=str(root / d.name))
        fit(LM(model, 2e-3), loader(d.train, 16, expert_steps, seed * 10 + k), [capture, timer], root / d.name)
        expert_loss[d.name] = loss_of(model, d.test)
        if k == 0:  # the capture's cost: the same fine-tune without it
            bare = peft.get_peft_model(
                transformers.LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16),
                peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"]))
            plain = StepTimer()
            fit(LM(bare, 2e-3), loader(d.train, 16, expert_steps, seed * 10 + k), [plain], root / "bare")
            timed = StepTimer()
            again = peft.get_peft_model(
                transformers.LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16),
                peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"]))
            fit(LM(again, 2e-3), loader(d.train, 16, expert_steps, seed * 10 + k),
                [CurvatureCapture(save_final=False, checkpoint_sidecars=False), timed], root / "timed")
            step_bare = statistics.median(plain.times[10:])
            step_captured = statistics.median(timed.times[10:])
        torch.save(torch.get_rng_state(), root / d.name / "rng_after.pt")
        stage.write_text(json.dumps({"loss": expert_loss[d.name], "step_bare": step_bare,
                                     "step_captured": step_captured}))
    experts_time = time.perf_counter() - started - base_time
    if cached is None:
        trained.write_text(json.dumps({"expert_loss": expert_loss, "step_bare": step_bare,
                                       "step_captured": step_captured}))
    base_state = {k: v for k, v in transformers.LlamaForCausalLM.from_pretrained(
        root / "base", dtype=torch.bfloat16).state_dict().items()}
    base_loss = {name: loss_of(load(base_state), d.test) for name, d in domains.items()}
    names = list(domains)
    experts = [adapters[n] for n in names]

    def normalized(losses: dict[str, float]) -> float:
        return sum(math.exp(expert_loss[n]) / math.exp(losses[n]) for n in names) / len(names)

    def val_score(state: dict[str, torch.Tensor]) -> float:
        model = load(state)
        return sum(expert_loss[n] / loss_of(model, domains[n].val) for n in names) / len(names)

    rows = {}
    for label, strategy in strategies().items():
        if only and label != "task_arithmetic" and not any(o in label for o in only):
            continue
        t0 = time.perf_counter()
        chosen = {}
        if label == "regmean (α on validation)":
            best = None
            for alpha in ALPHAS:
                state = merge(experts, root / "base", RegMean(alpha=alpha))
                score = val_score(state)
                if best is None or score > best[0]:
                    best = (score, state, alpha)
            _, state, chosen["alpha"] = best
        elif label == "regmean, α and λ on validation":
            result = sweep(strategy, experts, root / "base", val_score, {"alpha": ALPHAS}, scales=GRID)
            state = result.state
            chosen.update(result.arguments)
        elif isinstance(strategy, LiNeS):
            best = None
            for beta in BETAS:
                candidate = dataclasses.replace(strategy, beta=beta)
                state = merge(experts, root / "base", candidate)
                score = val_score(state)
                if best is None or score > best[0]:
                    best = (score, state, beta)
            _, state, chosen["beta"] = best
        elif getattr(strategy, "scalable", False) and label not in UNSWEPT:
            result = sweep_scale(strategy, experts, root / "base", val_score,
                                 ISO_GRID if label.startswith("iso") else GRID)
            state, chosen["scale"] = result.state, result.scale
        else:
            state = merge(experts, root / "base", strategy)
        model = load(state)
        losses = {n: loss_of(model, domains[n].test) for n in names}
        rows[label] = {"normalized": normalized(losses), "perplexity": {n: math.exp(v) for n, v in losses.items()},
                       **chosen, "seconds": time.perf_counter() - t0}
        print(f"  seed {seed} {label:<26} normalized {100 * rows[label]['normalized']:.1f}  {chosen}", flush=True)
    rows.update(regmean_plusplus_rows(experts, root / "base", domains, seed, val_score, normalized, only))
    rows.update(doge_rows(experts, root / "base", domains, seed, val_score, normalized, only))
    rows.update(fw_rows(experts, root / "base", domains, seed, normalized, only))
    extra = {}
    if quadratic:  # the Fisher-quadratic loss model (#19): its λ*, and how well it ranks real merges
        choice = quadratic_coefficients(experts, root / "base")
        model = load(merge(experts, root / "base", choice.strategy()))
        losses = {n: loss_of(model, domains[n].test) for n in names}
        rows["fisher-quadratic λ* (no data)"] = {"normalized": normalized(losses),
                                                 "perplexity": {n: math.exp(v) for n, v in losses.items()},
                                                 "weights": list(choice.weights)}
        g = torch.Generator().manual_seed(1000 + seed)
        n = len(experts)
        vectors = [[lam] * n for lam in GRID] + [(torch.rand(n, generator=g) * 0.8).tolist() for _ in range(12)]
        predicted = [-choice.predicted_mean(lam) for lam in vectors]
        measured = [val_score(merge(experts, root / "base", TaskArithmetic(weights=lam))) for lam in vectors]
        extra = {"spearman": spearman(predicted, measured), "lambda_star": list(choice.weights)}
        print(f"  seed {seed} quadratic model: λ* {[round(w, 3) for w in choice.weights]}, Spearman ρ "
              f"{extra['spearman']:.3f} over {len(vectors)} coefficient vectors", flush=True)
    return {
        **extra,
        "expert_perplexity": {n: math.exp(v) for n, v in expert_loss.items()},
        "base": {"normalized": normalized(base_loss), "perplexity": {n: math.exp(v) for n, v in base_loss.items()}},
        "rows": rows,
        "timing": {"pretrain_s": base_time, "experts_s": experts_time,
                   "step_s_without_capture": step_bare, "step_s_with_capture": step_captured,
                   "capture_overhead": step_captured / step_bare},
    }


def summarize(results: list[dict]) -> str:
    """The table over seeds: mean ± std of the normalized score, paired differences against tuned task arithmetic
    and (where the run has its row) TSV-M, and mean perplexities. A row missing on some seed is left out."""
    labels = [label for label in results[0]["rows"] if all(label in r["rows"] for r in results)]
    ta = [r["rows"]["task_arithmetic"]["normalized"] for r in results]
    tsv = [r["rows"]["tsv_merge"]["normalized"] for r in results] if "tsv_merge" in labels else None
    lines = [f"{'method':<28}{'normalized':>16}{'vs tuned TA (paired)':>24}"
             + (f"{'vs TSV-M (paired)':>22}" if tsv else "") + "  " + "  ".join(f"{n:>9}" for n in DOMAINS)]
    base = [r["base"]["normalized"] for r in results]
    lines.append(f"{'base (no merge)':<28}{_ms(base):>16}{'':>24}" + (f"{'':>22}" if tsv else "") + "  " + "  ".join(
        f"{statistics.mean(r['base']['perplexity'][n] for r in results):>9.2f}" for n in DOMAINS))
    for label in labels:
        values = [r["rows"][label]["normalized"] for r in results]
        diffs = [v - t for v, t in zip(values, ta)]
        against_tsv = f"{_ms([v - t for v, t in zip(values, tsv)], sign=True):>22}" if tsv else ""
        ppl = "  ".join(f"{statistics.mean(r['rows'][label]['perplexity'][n] for r in results):>9.2f}" for n in DOMAINS)
        lines.append(f"{label:<28}{_ms(values):>16}{_ms(diffs, sign=True):>24}{against_tsv}  {ppl}")
    experts = "  ".join(f"{statistics.mean(r['expert_perplexity'][n] for r in results):>9.2f}" for n in DOMAINS)
    lines.append(f"{'experts (own domain)':<28}{'100.0':>16}{'':>24}" + (f"{'':>22}" if tsv else "") + f"  {experts}")
    if "spearman" in results[0]:
        rho = [r["spearman"] for r in results]
        lines.append(f"Fisher-quadratic model: Spearman ρ (predicted loss vs validation score) "
                     f"{statistics.mean(rho):.2f} ± {statistics.stdev(rho) if len(rho) > 1 else 0.0:.2f}")
    over = [r["timing"]["capture_overhead"] for r in results]
    lines.append(f"capture overhead (step time with / without CurvatureCapture, median): {_ms(over, pct=False)}")
    return "\n".join(lines)


def _ms(values: list[float], sign: bool = False, pct: bool = True) -> str:
    scale = 100 if pct else 1
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    fmt = "+.1f" if sign else (".1f" if pct else ".3f")
    return f"{mean:{fmt}} ± {std:.1f}" if pct else f"{mean:{fmt}} ± {std:.3f}"


def measure_overhead(rounds: int, steps: int) -> dict:
    """The capture's step-time cost on its own: ``rounds`` pairs of short LoRA fine-tunes of a random base (the
    code domain), without and with ``CurvatureCapture`` (second moments + batch Fisher), alternated so that drift in
    the machine's load hits both alike; the median step time of each fit (after 10 warm-up steps), the ratio per
    pair, and the median ratio."""
    import peft
    import transformers

    domain = make_domains(0)["code"]
    ratios, bare_s, captured_s = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            times = {}
            for kind in ("bare", "captured"):
                torch.manual_seed(r)
                model = peft.get_peft_model(
                    transformers.LlamaForCausalLM(config()).to(torch.bfloat16),
                    peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"]))
                timer = StepTimer()
                extra = [CurvatureCapture(save_final=False, checkpoint_sidecars=False)] if kind == "captured" else []
                fit(LM(model, 2e-3), loader(domain.train, 16, steps, r), [*extra, timer], Path(tmp) / f"{kind}{r}")
                times[kind] = statistics.median(timer.times[10:])
            bare_s.append(times["bare"])
            captured_s.append(times["captured"])
            ratios.append(times["captured"] / times["bare"])
            print(f"  round {r}: step {times['bare'] * 1e3:.1f} ms bare, {times['captured'] * 1e3:.1f} ms captured, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    return {"bare_step_s": statistics.median(bare_s), "captured_step_s": statistics.median(captured_s),
            "ratios": ratios, "median_ratio": statistics.median(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, default=1600)
    parser.add_argument("--expert-steps", type=int, default=300)
    parser.add_argument("--out", default="benchmarks/_work/causal_lm.json")
    parser.add_argument("--overhead", action="store_true",
                        help="measure only the capture's step-time overhead (alternated pairs of short fits)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", nargs="*", default=None,
                        help="only the strategies whose row name contains one of these (task arithmetic always)")
    parser.add_argument("--cache", default=None,
                        help="keep each seed's base, adapters and expert losses in this folder and reuse them")
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed (seeds first..first+seeds-1)")
    parser.add_argument("--quadratic", action="store_true",
                        help="also the Fisher-quadratic λ* and its rank correlation with validation scores")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's threads (default: every core; 1 to run one seed per core side by side)")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                        help="print the table over the seeds of these --out files (runs of one seed each, side by "
                             "side) and exit")
    args = parser.parse_args()
    if args.summarize:
        print(summarize([seed for path in args.summarize for seed in json.loads(Path(path).read_text())]))
        return
    quiet()
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    if args.overhead:
        result = measure_overhead(args.rounds, 80)
        print(f"capture overhead: median step {result['bare_step_s'] * 1e3:.1f} ms without, "
              f"{result['captured_step_s'] * 1e3:.1f} ms with CurvatureCapture; median ratio over "
              f"{args.rounds} alternated pairs {result['median_ratio']:.3f} "
              f"(range {min(result['ratios']):.3f}–{max(result['ratios']):.3f})")
        return
    results = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            if args.cache:
                root = Path(args.cache) / f"seed{seed}-pretrain{args.pretrain_steps}-expert{args.expert_steps}"
                root.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            results.append(run_seed(seed, root, args.pretrain_steps, args.expert_steps, args.only, args.quadratic))
            print(f"seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(summarize(results))


if __name__ == "__main__":
    main()
