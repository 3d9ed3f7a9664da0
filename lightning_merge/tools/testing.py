"""Synthetic model families for tests, benchmarks and parity checks: Llama-architecture Hugging Face folders
(config.json + safetensors) with random weights, experts = base + sparse deltas. No download, no transformers
import needed to write them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_config(hidden: int = 64, layers: int = 2, intermediate: int = 176, vocab: int = 256, heads: int = 4,
                 kv_heads: int | None = None, tie_embeddings: bool = False) -> dict:
    """A LlamaForCausalLM config.json as a dict."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": tie_embeddings,
        "torch_dtype": "bfloat16",
    }


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a LlamaForCausalLM with this config, in Hugging Face order."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def write_llama_family(root: str | Path, config: dict, n_experts: int = 3, delta_density: float = 0.1,
                       delta_scale: float = 0.01, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                       shard_size: int = 2 << 30) -> tuple[Path, list[Path]]:
    """Write ``root/base`` and ``root/expert_{i}`` folders; experts = base + sparse Gaussian deltas.

    Returns:
        The base folder and the expert folders.
    """
    root = Path(root)
    shapes = llama_shapes(config)
    names = list(shapes)
    folders = [root / "base"] + [root / f"expert_{i}" for i in range(n_experts)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator().manual_seed(seed)
    # group tensors into shards by size, written one shard at a time for every model (bounded memory)
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = torch.Size(shapes[name]).numel() * torch.empty((), dtype=dtype).element_size()
        if groups[-1] and size + nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    for s, group in enumerate(groups):
        file = "model.safetensors" if len(groups) == 1 else f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
        base = {}
        for name in group:
            if name.endswith("norm.weight"):
                base[name] = (1.0 + 0.05 * torch.randn(shapes[name], generator=g)).to(dtype)
            else:
                base[name] = (0.02 * torch.randn(shapes[name], generator=g)).to(dtype)
        save_file(base, folders[0] / file, metadata={"format": "pt"})
        for _e, folder in enumerate(folders[1:]):
            expert = {}
            for name, value in base.items():
                mask = torch.rand(value.shape, generator=g) < delta_density
                delta = delta_scale * torch.randn(value.shape, generator=g) * mask
                expert[name] = (value.float() + delta).to(dtype)
            save_file(expert, folder / file, metadata={"format": "pt"})
            del expert
        weight_map.update({n: file for n in group})
    if len(groups) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        for folder in folders:
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folders[0], folders[1:]


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = False,
                bos_token: str = "<s>", eos_token: str = "</s>") -> str:
    """A chat template's text for ``messages``, rendered as transformers' ``apply_chat_template`` renders it
    (``transformers.utils.chat_template_utils``: a sandboxed Jinja environment with ``trim_blocks`` and
    ``lstrip_blocks``, the loop-controls extension and a ``raise_exception`` that raises ``TemplateError``; the
    special tokens passed as variables).

    Raises:
        jinja2.TemplateError: the template refuses the conversation (or does not parse).
    """
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                    bos_token=bos_token, eos_token=eos_token)
