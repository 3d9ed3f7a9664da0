"""A PEFT LoRA adapter from a full fine-tune (what ``mergekit-extract-lora`` does): for each 2-D linear weight,
ΔW = W_ft − W_base factored by its truncated SVD at rank K (the same factoring as ``merge(output="peft",
rank=K)``: :func:`~lightning_merge.engine.lowrank.factor_delta`); embeddings and LM heads that changed, and every
other tensor that changed (norms, biases, convolutions), are saved whole (``modules_to_save``). Tensor by tensor (two
reads of each tensor of the pair: one to find what changed, one to factor it), into an atomically committed folder
that ``peft.PeftModel.from_pretrained(base_model, OUT)`` loads.

The options of mergekit 0.1.5's ``mergekit-extract-lora`` are :func:`extract_lora`'s arguments, with its module rules
(``embed_lora``, ``save_modules``, ``exclude``/``include``, ``sv_epsilon``, ``skip_undecomposable``,
``distribute_scale``); docs/lora.md lists where the adapter differs from mergekit's on purpose.

With K at least the rank of every ΔW, base + adapter is the fine-tune (to float32 rounding of the factors); below,
the relative error ‖ΔW − BA‖/‖ΔW‖ of each module is recorded in ``lightning_merge.json``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_merge._version import __version__
from lightning_merge.engine.lowrank import factor_delta
from lightning_merge.files.atomic import commit, fsync_tree, partial_path, writing
from lightning_merge.files.outputs import check_output_path
from lightning_merge.files.ownership import write_record
from lightning_merge.files.safetensors import ShardWriter, TensorSpec
from lightning_merge.formats.lora import PEFT_PREFIX
from lightning_merge.sources.expert import Expert

#: names of input embeddings and output heads (saved whole unless ``embed_lora``)
EMBEDDING_MARKS = ("embed", "lm_head", "wte", "wpe", "embed_out")
#: names of output heads (linear layers: factored as ``lora_A``/``lora_B`` under ``embed_lora``)
HEAD_MARKS = ("lm_head", "embed_out")


@dataclass
class Extracted:
    """What :func:`extract_lora` wrote: the folder, the modules factored (with their rank and relative error) and
    the modules saved whole."""

    path: Path
    ranks: dict[str, int]
    relative_error: dict[str, float]
    modules_to_save: list[str]


def _vocab_size(folder: Path | None) -> int | None:
    config = folder / "config.json" if folder is not None and folder.is_dir() else None
    if config is None or not config.is_file():
        return None
    try:
        found = json.loads(config.read_text()).get("vocab_size")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return found if isinstance(found, int) and not isinstance(found, bool) else None


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _compile(patterns: Sequence[str], argument: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"{argument} '{pattern}' is not a regular expression ({e})") from None
    return compiled


def weight_kind(name: str, shape: Sequence[int], vocab: int | None) -> str:
    """What mergekit's module type would be for the weight ``name``: ``"embedding"`` (an input embedding,
    ``nn.Embedding``), ``"head"`` (an output embedding: a linear layer onto the vocabulary), ``"linear"`` (another
    2-D ``.weight``) or ``"other"`` (norms, convolutions, biases: what mergekit calls undecomposable).

    Args:
        name: the tensor's name.
        shape: its shape.
        vocab: the config's ``vocab_size`` (a 2-D weight with that many rows is a head), or None.
    """
    if len(shape) != 2 or not name.endswith(".weight"):
        return "other"
    if any(m in name for m in HEAD_MARKS):
        return "head"
    if any(m in name for m in EMBEDDING_MARKS):
        return "embedding"
    return "head" if vocab is not None and shape[0] == vocab else "linear"


def factor_module(delta: torch.Tensor, max_rank: int, *, sv_epsilon: float = 0.0, distribute_scale: bool = True,
                  transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One module's LoRA factors as ``mergekit-extract-lora`` makes them: the truncated SVD ΔW ≈ U_k Σ_k V_kᵀ
    (:func:`~lightning_merge.engine.lowrank.factor_delta`), k = min(max_rank, rows, cols) and, with
    ``sv_epsilon`` > 0, at most the number of singular values above it.

    Args:
        delta: ΔW (float32, 2-D).
        max_rank: the largest rank kept.
        sv_epsilon: singular values ≤ this (absolute, in ΔW's units) are discarded; 0 keeps all (mergekit's
            ``--sv-epsilon``).
        distribute_scale: A = √Σ Vᵀ and B = U√Σ (True), or A = Σ Vᵀ and B = U (False; mergekit's
            ``--no-distribute-scale``).
        transpose: factor ΔWᵀ (an embedding: PEFT's ``lora_embedding_A`` (k, vocab) and ``lora_embedding_B``
            (dim, k)).

    Returns:
        ``(A, B, ‖ΔW − BA‖/‖ΔW‖)``; k may be 0 (every singular value ≤ ``sv_epsilon``).
    """
    m = delta.T if transpose else delta
    a, b, error = factor_delta(m, max_rank, fan_in_fan_out=False)
    sigma = a.norm(dim=1) * b.norm(dim=0)  # ‖√σ vᵀ‖ ‖u √σ‖ = σ
    k = a.shape[0]
    if sv_epsilon > 0:
        k = min(k, int((sigma > sv_epsilon).sum()))
        if k < a.shape[0]:
            a, b = a[:k].contiguous(), b[:, :k].contiguous()
            norm = float(m.norm())
            error = float((m - b @ a).norm()) / norm if norm > 0 else 0.0
    if not distribute_scale:
        root = sigma[:k].sqrt()
        a = a * root.unsqueeze(1)
        b = b / torch.where(root > 0, root, torch.ones_like(root))
    return a, b, error


def _factor_names(module: str, transposed: bool) -> tuple[str, str]:
    if transposed:  # PEFT's Embedding layer: parameters, not Linear submodules (no ``.weight``)
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def extract_lora(finetuned: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike,
                 rank: int = 128, *, distribute_scale: bool = True, embed_lora: bool = False,
                 save_modules: Sequence[str] = (), exclude: Sequence[str] = (), include: Sequence[str] = (),
                 sv_epsilon: float = 0.0, skip_undecomposable: bool = False, overwrite: bool = False,
                 trust_checkpoint: bool = False) -> Extracted:
    """Write the PEFT LoRA adapter that turns ``base`` into ``finetuned``.

    Modules are decided as ``mergekit-extract-lora`` decides them, in this order: a module named in
    ``save_modules`` (full name or last component) is saved whole; without ``embed_lora``, embeddings and heads
    are saved whole unless an ``exclude`` pattern matches them (``include`` does not apply to them); a module that
    an ``include`` pattern does not match (when there are any) or an ``exclude`` pattern matches is left out;
    linear weights (and, with ``embed_lora``, embeddings and heads) are factored; the rest (norms, convolutions)
    are saved whole, or left out with ``skip_undecomposable``. Modules saved whole by these automatic rules are
    written only when they changed (mergekit writes them regardless; the adapter applied is the same).

    Args:
        finetuned: the fine-tuned model (a folder, ``.safetensors`` or ``.ckpt``).
        base: the model it was fine-tuned from (the same tensor names and shapes).
        out: the adapter folder to create.
        rank: K, the largest rank of a factored module (mergekit's ``--max-rank``, default 128); a module of
            smaller dimension, or with fewer singular values above ``sv_epsilon``, gets its own rank
            (``rank_pattern``).
        distribute_scale: split Σ as √Σ into both factors (A = √Σ Vᵀ, B = U√Σ); False puts it in A (A = Σ Vᵀ,
            B = U), mergekit's ``--no-distribute-scale``.
        embed_lora: factor input embeddings (PEFT's ``lora_embedding_A``/``lora_embedding_B``, of ΔEᵀ) and output
            heads (``lora_A``/``lora_B``) instead of saving them whole (mergekit's ``--embed-lora``).
        save_modules: modules saved whole, changed or not, by full name (``model.norm``) or last component
            (``lm_head``, ``o_proj``: every module so named); mergekit's repeatable ``--save-module``.
        exclude: regular expressions (``re.search`` on the module name, without ``.weight``): a module matching
            any is neither factored nor saved (unless in ``save_modules``); mergekit's ``--exclude-regex``.
        include: regular expressions: when given, only modules matching one are factored or saved as
            undecomposable (embeddings without ``embed_lora`` and ``save_modules`` are not filtered); mergekit's
            ``--include-regex``.
        sv_epsilon: discard singular values of ΔW at or below this (absolute); each module's rank is then the
            number above it, at most ``rank`` (``rank_pattern``); a module with none left is dropped (mergekit
            writes a rank-0 module that PEFT refuses to load). 0 keeps every one up to ``rank``.
        skip_undecomposable: leave out modules that are neither linear nor embeddings (norms, convolutions)
            instead of saving them whole.
        overwrite: replace an earlier output of lightning-merge at ``out``.
        trust_checkpoint: allow unpickling ``.ckpt`` files (trusted files only).

    Raises:
        ValueError: a bad rank, ``sv_epsilon`` or regular expression, or models whose tensor names or shapes
            differ (naming the tensor).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if isinstance(sv_epsilon, bool) or not isinstance(sv_epsilon, (int, float)) or not sv_epsilon >= 0:
        raise ValueError(f"sv_epsilon must be a number >= 0 (0 keeps every singular value), got {sv_epsilon!r}")
    for argument, value in (("save_modules", save_modules), ("exclude", exclude), ("include", include)):
        if isinstance(value, str):
            raise ValueError(f"{argument} takes a list of strings, got the string {value!r}: pass [{value!r}]")
    excludes = _compile(exclude, "exclude regex")
    includes = _compile(include, "include regex")
    out = Path(out)
    if Path(finetuned).resolve() == Path(base).resolve():
        raise ValueError(f"the fine-tune and the base are the same model ('{base}'): there is no change to extract")
    ft = Expert(finetuned, trust_checkpoint=trust_checkpoint)
    bs = Expert(base, trust_checkpoint=trust_checkpoint)
    missing = sorted(set(bs.names()) ^ set(ft.names()))
    if missing:
        where = "the fine-tune" if missing[0] in bs else "the base"
        raise ValueError(f"'{missing[0]}' is missing from {where} ({len(missing)} tensor(s) differ between "
                         f"'{finetuned}' and '{base}'): an adapter holds changes to the base's tensors; extract from "
                         "the model that was fine-tuned from this base")
    vocab = _vocab_size(bs.path)
    # each floating tensor's module and the module's kind (that of its 2-D ``.weight``, else "other")
    members: dict[str, list[str]] = {}
    kinds: dict[str, str] = {}
    for name in bs.names():
        spec, other = bs.spec(name), ft.spec(name)
        if spec.shape != other.shape:
            raise ValueError(f"tensor '{name}' is {list(other.shape)} in the fine-tune and {list(spec.shape)} in the "
                             "base: the vocabulary or architecture changed; an adapter cannot hold that")
        if not spec.dtype.is_floating_point:
            continue
        module = _module(name)
        members.setdefault(module, []).append(name)
        kind = weight_kind(name, spec.shape, vocab)
        if kind != "other" or module not in kinds:
            kinds[module] = kind
    wanted = set(save_modules)

    def matches(patterns: list[re.Pattern], module: str) -> bool:
        return any(p.search(module) for p in patterns)

    factored: list[tuple[str, bool]] = []  # (weight name, transposed: an input embedding)
    whole: set[str] = set()  # modules saved whole: every tensor of the module
    for module, kind in kinds.items():
        key = module.rsplit(".", 1)[-1]
        if module in wanted or key in wanted:
            whole.add(module)
            continue
        automatic = False
        if kind in ("embedding", "head") and not embed_lora:
            automatic = not matches(excludes, module)
        elif (includes and not matches(includes, module)) or matches(excludes, module):
            continue
        elif kind != "other":
            weight = f"{module}.weight"
            rest = [n for n in members[module] if n != weight]
            if any(not torch.equal(ft.tensor(n), bs.tensor(n)) for n in rest):
                automatic = True  # its bias changed: saved whole, weight and bias (exact; no lora_bias)
            else:
                factored.append((weight, kind == "embedding"))
                continue
        else:
            automatic = not skip_undecomposable
        if automatic and any(not torch.equal(ft.tensor(n), bs.tensor(n)) for n in members[module]):
            whole.add(module)
    unmatched = [m for m in save_modules if m not in kinds and not any(k.rsplit(".", 1)[-1] == m for k in kinds)]
    if unmatched:
        raise ValueError(f"save module '{unmatched[0]}' names no module of '{finetuned}': give a module's full name "
                         "(model.norm) or its last component (lm_head)")
    saved = [n for n in bs.names() if _module(n) in whole]
    entries: list[tuple[str, TensorSpec]] = []
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    dropped: list[str] = []
    for name, transposed in factored:
        module = _module(name)
        rows, cols = bs.spec(name).shape
        if transposed:
            rows, cols = cols, rows
        k = min(rank, rows, cols)
        if sv_epsilon > 0:
            # the rank depends on the singular values: factor once to count them (the factors are dropped and made
            # again, identically, when written: one module in memory at a time)
            k = factor_module(ft.float32(name) - bs.float32(name), rank, sv_epsilon=sv_epsilon,
                              transpose=transposed)[0].shape[0]
            if k == 0:
                dropped.append(module)
                continue
        ranks[module] = k
        a_name, b_name = _factor_names(module, transposed)
        entries.append((a_name, TensorSpec((k, cols), torch.float32)))
        entries.append((b_name, TensorSpec((rows, k), torch.float32)))
    factored = [(n, t) for n, t in factored if _module(n) in ranks]
    for name in saved:
        entries.append((f"{PEFT_PREFIX}{name}", TensorSpec(ft.spec(name).shape, ft.spec(name).dtype)))
    if not entries:
        raise ValueError(f"'{finetuned}' has no floating tensor to extract a change from (with these include/"
                         "exclude patterns and sv_epsilon)")

    inputs = [p for e in (ft, bs) for p in e.sources()]
    check_output_path(out, overwrite, inputs=inputs, folder=True)
    tmp = partial_path(out)
    with writing(out):
        tmp.mkdir(parents=True)
        try:
            file = ShardWriter(tmp / "adapter_model.safetensors", entries, {"format": "pt"})
            try:
                for name, transposed in factored:
                    module = _module(name)
                    a, b, errors[module] = factor_module(ft.float32(name) - bs.float32(name), rank,
                                                         sv_epsilon=sv_epsilon, distribute_scale=distribute_scale,
                                                         transpose=transposed)
                    if a.shape[0] != ranks[module]:  # not expected: the same computation as when planned
                        raise RuntimeError(f"'{name}': rank {a.shape[0]} when written, {ranks[module]} when planned")
                    a_name, b_name = _factor_names(module, transposed)
                    file.write(a_name, a)
                    file.write(b_name, b)
                    del a, b
                for name in saved:
                    file.write(f"{PEFT_PREFIX}{name}", ft.tensor(name))
            finally:
                file.close(sync=True)
            top = max(ranks.values(), default=rank)
            pattern = {re.escape(m): r for m, r in ranks.items() if r != top}
            architectures = []
            if bs.path is not None and (bs.path / "config.json").is_file():
                architectures = json.loads((bs.path / "config.json").read_text()).get("architectures") or []
            causal = any(str(a).endswith("ForCausalLM") for a in architectures)
            modules_to_save = sorted(whole)
            config = {
                "base_model_name_or_path": str(base),
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM" if causal else None,
                "r": top,
                "lora_alpha": top,
                "rank_pattern": pattern,
                "alpha_pattern": pattern,
                "target_modules": sorted(ranks),
                "modules_to_save": modules_to_save or None,
                "lora_dropout": 0.0,
                "bias": "none",
                "fan_in_fan_out": False,
                "use_rslora": False,
                "use_dora": False,
                "init_lora_weights": True,
                "inference_mode": True,
            }
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            worst = max(errors.values(), default=0.0)
            (tmp / "README.md").write_text(
                "---\nlibrary_name: peft\ntags:\n- lora\n- lightning-merge\n---\n"
                f"# {out.name}\n\nA LoRA adapter extracted with lightning-merge {__version__} from the full fine-tune "
                f"`{finetuned}` of `{base}`: each linear weight's ΔW as its truncated SVD at rank ≤ {rank} "
                f"({len(ranks)} modules, largest relative error {worst:.3g}); "
                f"{len(modules_to_save)} module(s) saved whole.\n")
            write_record(tmp, {"kind": "extract-lora", "finetuned": str(finetuned), "base": str(base),
                               "rank": rank, "distribute_scale": distribute_scale, "embed_lora": embed_lora,
                               "save_modules": list(save_modules), "exclude": list(exclude),
                               "include": list(include), "sv_epsilon": sv_epsilon,
                               "skip_undecomposable": skip_undecomposable, "ranks": ranks,
                               "relative_error": errors, "dropped": dropped,
                               "modules_to_save": modules_to_save})
            fsync_tree(tmp)
            commit(tmp, out, replace="own" if overwrite else "never")
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Extracted(out, ranks, errors, sorted(whole))


__all__ = ["EMBEDDING_MARKS", "HEAD_MARKS", "Extracted", "extract_lora", "factor_module", "weight_kind"]
