"""A PEFT LoRA adapter from a full fine-tune (what ``mergekit-extract-lora`` does): for each 2-D linear weight,
ΔW = W_ft − W_base factored by its truncated SVD at rank K (the same factoring as ``merge(output="peft",
rank=K)``: :func:`~lightning_merge.engine.lowrank.factor_delta`); embeddings and LM heads that changed, and every
other tensor that changed (norms, biases, convolutions), are saved whole (``modules_to_save``). Tensor by tensor (two
reads of each tensor of the pair: one to find what changed, one to factor it), into an atomically committed folder
that ``peft.PeftModel.from_pretrained(base_model, OUT)`` loads.

With K at least the rank of every ΔW, base + adapter is the fine-tune (to float32 rounding of the factors); below,
the relative error ‖ΔW − BA‖/‖ΔW‖ of each module is recorded in ``lightning_merge.json``.
"""

from __future__ import annotations

import json
import os
import re
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

#: names of input embeddings and output heads (mergekit saves those whole rather than factoring them)
EMBEDDING_MARKS = ("embed", "lm_head", "wte", "wpe", "embed_out")


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


def extract_lora(finetuned: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, rank: int, *,
                 overwrite: bool = False, trust_checkpoint: bool = False) -> Extracted:
    """Write the PEFT LoRA adapter that turns ``base`` into ``finetuned``.

    Args:
        finetuned: the fine-tuned model (a folder, ``.safetensors`` or ``.ckpt``).
        base: the model it was fine-tuned from (the same tensor names and shapes).
        out: the adapter folder to create.
        rank: K, the rank of each factored module (a module of smaller dimension gets its full rank: ``rank_pattern``).
        overwrite: replace an earlier output of lightning-merge at ``out``.
        trust_checkpoint: allow unpickling ``.ckpt`` files (trusted files only).

    Raises:
        ValueError: a bad rank, or models whose tensor names or shapes differ (naming the tensor).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
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
    factored: list[str] = []  # 2-D linear weights
    whole: set[str] = set()  # modules saved whole
    for name in bs.names():
        spec, other = bs.spec(name), ft.spec(name)
        if spec.shape != other.shape:
            raise ValueError(f"tensor '{name}' is {list(other.shape)} in the fine-tune and {list(spec.shape)} in the "
                             "base: the vocabulary or architecture changed; an adapter cannot hold that")
        if not spec.dtype.is_floating_point:
            continue
        linear = len(spec.shape) == 2 and name.endswith(".weight") and \
            not any(m in name for m in EMBEDDING_MARKS) and spec.shape[0] != vocab
        if linear:
            factored.append(name)
        elif not torch.equal(ft.tensor(name), bs.tensor(name)):
            whole.add(_module(name))
    # a linear module whose bias changed is in ``whole``: saved whole, weight and bias (exact; no lora_bias)
    factored = [n for n in factored if _module(n) not in whole]
    saved = [n for n in bs.names() if _module(n) in whole]
    entries: list[tuple[str, TensorSpec]] = []
    ranks: dict[str, int] = {}
    for name in factored:
        rows, cols = bs.spec(name).shape
        k = min(rank, rows, cols)
        module = _module(name)
        ranks[module] = k
        entries.append((f"{PEFT_PREFIX}{module}.lora_A.weight", TensorSpec((k, cols), torch.float32)))
        entries.append((f"{PEFT_PREFIX}{module}.lora_B.weight", TensorSpec((rows, k), torch.float32)))
    for name in saved:
        entries.append((f"{PEFT_PREFIX}{name}", TensorSpec(ft.spec(name).shape, ft.spec(name).dtype)))
    if not entries:
        raise ValueError(f"'{finetuned}' has no floating tensor to extract a change from")

    inputs = [p for e in (ft, bs) for p in e.sources()]
    check_output_path(out, overwrite, inputs=inputs, folder=True)
    tmp = partial_path(out)
    errors: dict[str, float] = {}
    with writing(out):
        tmp.mkdir(parents=True)
        try:
            file = ShardWriter(tmp / "adapter_model.safetensors", entries, {"format": "pt"})
            try:
                for name in factored:
                    module = _module(name)
                    delta = ft.float32(name) - bs.float32(name)
                    a, b, errors[module] = factor_delta(delta, rank, fan_in_fan_out=False)
                    file.write(f"{PEFT_PREFIX}{module}.lora_A.weight", a)
                    file.write(f"{PEFT_PREFIX}{module}.lora_B.weight", b)
                    del delta, a, b
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
                f"`{finetuned}` of `{base}`: each changed linear weight's ΔW as its truncated SVD at rank {rank} "
                f"({len(ranks)} modules, largest relative error {worst:.3g}); "
                f"{len(modules_to_save)} module(s) saved whole.\n")
            write_record(tmp, {"kind": "extract-lora", "finetuned": str(finetuned), "base": str(base),
                               "rank": rank, "ranks": ranks, "relative_error": errors,
                               "modules_to_save": modules_to_save})
            fsync_tree(tmp)
            commit(tmp, out, replace="own" if overwrite else "never")
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Extracted(out, ranks, errors, sorted(whole))


__all__ = ["EMBEDDING_MARKS", "Extracted", "extract_lora"]
