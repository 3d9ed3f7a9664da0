"""The ``lightning-merge`` command. Imports neither Lightning nor transformers on the merge path."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lightning_merge.files.text import byte_size

if TYPE_CHECKING:
    from lightning_merge.engine.outputs import DryRun


def _parse_set(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0]
            raise ValueError(f"--set {key.strip()}={value}: the value is not valid YAML ({first})") from None
    if out:
        from lightning_merge.tools.recipe_expansion import check_expansion

        check_expansion(out, "--set")
    return out


def cmd_merge(args: argparse.Namespace) -> int:
    from lightning_merge.engine.distributed import join_launcher_group, launcher_world_size

    nproc = args.nproc
    if nproc is not None and nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc}")
    if not 0 < args.rendezvous_timeout < float("inf"):
        raise ValueError(f"--rendezvous-timeout must be a positive number of seconds, got {args.rendezvous_timeout}")
    if nproc == 1 or args.dry_run:  # one process, whatever a launcher's variables say
        return _merge_once(args)
    launched = launcher_world_size()
    if nproc is not None and launched > 1:
        raise ValueError(f"--nproc {nproc} inside a {launched}-process job (WORLD_SIZE={launched}): each of its "
                         "processes would start its own merge of OUT; drop --nproc to split the merge over the "
                         "launcher's processes, or pass --nproc 1 to merge in one process")
    if nproc is not None:
        from lightning_merge.engine.distributed import spawn

        started = time.perf_counter()
        spawn(nproc, _merge_rank, (vars(args),))
        from lightning_merge.files.remote import redact

        print(f"merged into {redact(args.out)} with {nproc} processes in {time.perf_counter() - started:.1f}s",
              file=sys.stderr)
        return 0
    if join_launcher_group(args.rendezvous_timeout):  # launched by torchrun (one or several nodes): its group
        import torch.distributed as dist

        try:
            return _merge_once(args, group="world", quiet=dist.get_rank() != 0)
        finally:
            dist.destroy_process_group()
    return _merge_once(args)


def _merge_rank(rank: int, world_size: int, namespace: dict) -> None:
    """One worker of ``merge --nproc`` (spawned; the process group is already joined)."""
    _merge_once(argparse.Namespace(**namespace), group="world", quiet=rank != 0)


def _merge_once(args: argparse.Namespace, group: Any = None, quiet: bool = False) -> int:
    from lightning_merge.engine.run import merge
    from lightning_merge.tools.recipe import load_recipe

    started = time.perf_counter()
    recipe = load_recipe(args.recipe, overrides=_parse_set(args.set), trust_checkpoint=args.trust_checkpoint)
    if recipe.tokenizer and Path(str(args.out)).suffix in (".safetensors", ".ckpt"):
        from lightning_merge.errors import RecipeError

        raise RecipeError(f"{recipe.path}: tokenizer merging (tokenizer_source / tokenizer) reorders the embedding "
                          f"rows and writes the tokenizer that goes with them, which only a folder output holds; "
                          f"'{args.out}' would keep the rows without it: give an output folder")
    dtype = args.dtype or recipe.dtype
    out = merge(
        recipe.experts,
        base=recipe.base,
        strategy=recipe.strategy,
        out=args.out,
        include=args.include,
        exclude=args.exclude,
        dtype=dtype,
        on_missing=args.on_missing,
        on_missing_statistic=args.on_missing_statistic,
        shard_size=_shard_size(args),
        overwrite=args.overwrite,
        threads=args.threads,
        memory_budget=args.memory_budget,
        progress=False if args.no_progress or quiet else None,
        output=args.output,
        rank=args.rank,
        dry_run=args.dry_run,
        group=group,
        files=recipe.files,
    )
    if quiet:
        return 0
    if args.dry_run:
        _print_plan(out, recipe.path)
        return 0
    from lightning_merge.files.remote import redact

    print(f"merged {len(recipe.experts)} experts with {recipe.strategy.name} into {redact(out)} "
          f"in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0


def parse_kmb(value: str) -> int:
    """mergekit's ``--out-shard-size`` value: a number with ``K``, ``M`` or ``B`` (10³, 10⁶, 10⁹); mergekit compares it
    with each shard's bytes (its help says parameters, its writer counts bytes), so it is a size in bytes here too.

    Raises:
        ValueError: naming the option and the accepted forms.
    """
    text = str(value).strip()
    factor = {"k": 1000, "m": 1000**2, "b": 1000**3}.get(text[-1:].lower(), 1)
    digits = text[:-1] if factor > 1 else text
    if not digits.isdigit() or int(digits) <= 0:
        raise ValueError(f"--out-shard-size {value!r}: give a positive whole number, optionally with K, M or B "
                         "(thousands, millions, billions of bytes), as mergekit does; or --shard-size 5GB")
    return int(digits) * factor


def _shard_size(args: argparse.Namespace) -> Any:
    if getattr(args, "out_shard_size", None) is None:
        return args.shard_size or "5GB"
    if args.shard_size is not None:
        raise ValueError("give --shard-size or mergekit's --out-shard-size, not both")
    return parse_kmb(args.out_shard_size)


def _print_plan(plan: DryRun, source: Any) -> None:
    t = plan.tensors
    print(f"plan of {source} (dry run: nothing read or written)")
    print(f"  strategy    {json.dumps(plan.strategy)}" + ("  (first pass over the model)" if plan.global_pass else ""))
    print(f"  base        {plan.base}")
    for name, found in zip(plan.experts, plan.statistics):
        stats = ", ".join(f"{k}: {v or 'MISSING'}" for k, v in found.items())
        print(f"  expert      {name}" + (f"  ({stats})" if stats else ""))
    print(f"  tensors     {t.merge} merged, {t.copy} copied, {t.non_floating} non-floating checked; "
          f"{plan.parameters:,} parameters")
    size = f", {byte_size(plan.output_bytes)}" if plan.output_bytes is not None else ""
    exists = " (exists: --overwrite replaces it)" if plan.output_exists else ""
    print(f"  output      {plan.output} ({plan.output_kind}{size}){exists}")


def describe(path: str | Path) -> dict[str, Any]:
    """What a model, a PEFT adapter or a statistics sidecar holds: counts, dtypes, size, architecture, statistics,
    and how it was made (``lightning_merge.json``)."""
    from lightning_merge.files.remote import is_url, redact
    from lightning_merge.formats.sidecar import SIDECAR_SUFFIX, Statistics, fetch_with_sidecar
    from lightning_merge.sources.distcp import DistributedCheckpoint, is_distributed_checkpoint
    from lightning_merge.sources.expert import Expert

    shown = redact(path)  # a URL is read from its local copy and shown without its credentials
    path = fetch_with_sidecar(str(path)) if is_url(path) else Path(path)
    if path.name.endswith(SIDECAR_SUFFIX) or path.name == "statistics.safetensors":
        stats = Statistics.load(path)
        return {"path": shown, "kind": "statistics", "statistics": _describe_stats(stats),
                "metadata": {k: v for k, v in stats.metadata.items() if k not in ("kinds", "base_fingerprint")}}
    if path.is_dir() and (path / "adapter_config.json").exists():
        return _describe_adapter(path)
    expert = Expert(path, trust_checkpoint=False)
    dtypes: Counter[str] = Counter()
    params = 0
    size = 0
    for name in expert.names():
        spec = expert.spec(name)
        dtypes[str(spec.dtype).replace("torch.", "")] += 1
        params += spec.numel
        size += spec.nbytes
    info: dict[str, Any] = {
        "path": shown,
        "kind": "model",
        "tensors": len(expert.names()),
        "parameters": params,
        "bytes": size,
        "dtypes": dict(dtypes),
        "statistics": _describe_stats(expert.statistics) if expert.statistics else {},
    }
    folder = path if path.is_dir() else None
    if folder is not None and is_distributed_checkpoint(folder):
        info["distributed_checkpoint"] = DistributedCheckpoint(folder).summary()
    if folder is not None and (folder / "config.json").exists():
        info["architecture"] = _architecture(folder / "config.json")
    provenance = (folder / "lightning_merge.json") if folder is not None else None
    if provenance is not None and provenance.exists():
        info["merged_by"] = json.loads(provenance.read_text())
    elif path.suffix == ".safetensors":
        from lightning_merge.files.safetensors import SafetensorsFile

        with SafetensorsFile(path) as file:
            if "lightning_merge" in file.metadata:
                info["merged_by"] = json.loads(file.metadata["lightning_merge"])
    return info


def _architecture(config_path: Path) -> dict[str, Any]:
    from lightning_merge.files.atomic import special_file_kind

    if special_file_kind(config_path) is not None:  # a FIFO would block the read
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, OSError):
        return {}
    keys = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "vocab_size", "torch_dtype")
    return {k: config[k] for k in keys if k in config}


def _describe_adapter(path: Path) -> dict[str, Any]:
    """A PEFT adapter as an adapter: ranks, alpha, targets, base, size, statistics (no base is read)."""
    from lightning_merge.files.safetensors import SafetensorsFile
    from lightning_merge.formats.lora import adapter_base_path, read_adapter_config
    from lightning_merge.formats.sidecar import SIDECAR_NAME, Statistics

    config = read_adapter_config(path)
    ranks: Counter[int] = Counter()
    params = size = 0
    weights = path / "adapter_model.safetensors"
    modules = 0
    if weights.exists():
        with SafetensorsFile(weights) as file:
            for key in file.keys():
                spec = file.spec(key)
                params += spec.numel
                size += spec.nbytes
                if ".lora_A." in key:
                    ranks[spec.shape[0]] += 1
                    modules += 1
    base = adapter_base_path(path)
    info: dict[str, Any] = {
        "path": str(path),
        "kind": "adapter",
        "peft_type": config.get("peft_type"),
        "rank": sorted(ranks) if len(ranks) > 1 else next(iter(ranks), config.get("r")),
        "lora_alpha": config.get("lora_alpha"),
        "use_rslora": bool(config.get("use_rslora", False)),
        "target_modules": config.get("target_modules"),
        "modules": modules,
        "parameters": params,
        "bytes": size,
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "base_found": str(base) if base is not None else None,
        "statistics": {},
    }
    if (path / SIDECAR_NAME).exists():
        info["statistics"] = _describe_stats(Statistics.load(path / SIDECAR_NAME))
    if (path / "lightning_merge.json").exists():
        info["merged_by"] = json.loads((path / "lightning_merge.json").read_text())
    return info


def _describe_stats(stats: Any) -> dict[str, Any]:
    out = {}
    for kind, meta in stats.kinds.items():
        summary = {k: v for k, v in meta.items() if not isinstance(v, dict)}
        out[kind] = {"tensors": len(stats.names(kind)), **summary}
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['path']} ({info['kind']})")
    if info["kind"] == "model":
        print(f"  tensors     {info['tensors']}")
        print(f"  parameters  {info['parameters']:,}")
        print(f"  size        {byte_size(info['bytes'])}")
        print(f"  dtypes      {', '.join(f'{k} ({v})' for k, v in info['dtypes'].items())}")
        dcp = info.get("distributed_checkpoint")
        if dcp:
            step = f", step {dcp['global_step']}" if "global_step" in dcp else ""
            moments = f"; optimizer exp_avg_sq for {dcp['exp_avg_sq']} tensors" if dcp["exp_avg_sq"] else ""
            print(f"  format      distributed checkpoint, {dcp['shard_files']} shard files{step}{moments}")
        arch = info.get("architecture")
        if arch:
            print(f"  architecture {', '.join(f'{k}={v}' for k, v in arch.items())}")
    if info["kind"] == "adapter":
        print(f"  LoRA        rank {info['rank']}, alpha {info['lora_alpha']}"
              f"{', rsLoRA' if info['use_rslora'] else ''}, {info['modules']} modules")
        print(f"  targets     {info['target_modules']}")
        print(f"  parameters  {info['parameters']:,} ({byte_size(info['bytes'])})")
        found = "found" if info["base_found"] else "not a local path: pass --base / base="
        print(f"  base        {info['base_model_name_or_path']} ({found})")
    merged_by = info.get("merged_by")
    if merged_by:
        strategy = merged_by.get("strategy", {})
        print(f"  merged by   lightning-merge {merged_by.get('version', '?')}: {strategy.get('name', '?')} of "
              f"{len(merged_by.get('experts', []))} experts ({', '.join(map(str, merged_by.get('experts', [])))})")
    stats = info["statistics"]
    if not stats:
        print("  statistics  none")
    for kind, meta in stats.items():
        extras = ", ".join(f"{k}={v}" for k, v in meta.items() if k != "tensors")
        print(f"  statistics  {kind}: {meta['tensors']} tensors" + (f" ({extras})" if extras else ""))
    return 0


def cmd_export_second_moments(args: argparse.Namespace) -> int:
    from lightning_merge.files.remote import basename, is_url, redact
    from lightning_merge.formats.sidecar import export_second_moments, find_sidecar
    from lightning_merge.sources.distcp import is_distributed_checkpoint, optimizer_second_moments

    source: Any = args.source if is_url(args.source) else Path(args.source)  # Path() would fold a URL's "//"
    if not basename(source).endswith(".statistics.safetensors") and basename(source) != "statistics.safetensors":
        found = find_sidecar(source)
        if found is None and is_distributed_checkpoint(source):  # its optimizer state holds them, keyed by name
            found = optimizer_second_moments(source)
        if found is None:
            raise FileNotFoundError(f"'{source}' has no statistics sidecar (X.statistics.safetensors) next to it")
        source = found
    out = export_second_moments(source, args.out, strip_prefix=args.strip_prefix, bias_correct=args.bias_correct,
                                overwrite=args.overwrite, inputs=[args.source])
    print(f"wrote {redact(out)}")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from lightning_merge.files.remote import exists, redact
    from lightning_merge.tools.averaging import average_checkpoints, distinct_checkpoints, read_info, select_checkpoints

    # OUT among the checkpoints (a glob over the run's folder) is skipped only when it is an earlier average or
    # merge (distinct_checkpoints leaves those out); a checkpoint of the run named as OUT stays an input, and is
    # refused as the output.
    infos = [read_info(p, args.trust_checkpoint) for p in args.checkpoints]
    infos, skipped = distinct_checkpoints(infos)
    for path, why in skipped:
        print(f"  skipped {redact(path)}: {why}", file=sys.stderr)
    chosen = select_checkpoints(infos, select=args.select, k=args.k, mode=args.mode) if args.select != "all" else infos
    paths = [str(i.path) for i in chosen]
    if args.dry_run:
        from lightning_merge.tools.averaging import checkpoint_weights

        weights = checkpoint_weights(chosen, args.weighting, mwa_by=args.mwa_by, p=args.p, mode=args.mode)
        print(f"plan (dry run: nothing averaged or written): {len(paths)} checkpoints, {args.weighting}")
        for path, w in zip(paths, weights or [None] * len(paths)):
            print(f"  {redact(path)}" + (f"  weight {w:.4f}" if w is not None else f"  ({args.weighting} per entry)"))
        print(f"  output      {redact(args.out)}" + (" (exists: --overwrite replaces it)" if exists(args.out) else ""))
        return 0
    _, weights = average_checkpoints(
        paths, args.out, weighting=args.weighting, mwa_by=args.mwa_by, p=args.p, mode=args.mode, source=args.source,
        include=args.include, exclude=args.exclude, keep_training_state=not args.weights_only,
        on_missing_statistic=args.on_missing_statistic, trust_checkpoint=args.trust_checkpoint,
        overwrite=args.overwrite,
    )
    for path, w in zip(paths, weights or [None] * len(paths)):
        print(f"  {redact(path)}" + (f"  weight {w:.4f}" if w is not None else f"  ({args.weighting} per entry)"))
    print(f"wrote {redact(args.out)} (average of {len(paths)} checkpoints, {args.weighting})")
    return 0


def cmd_continual(args: argparse.Namespace) -> int:
    from lightning_merge.continual.state import ContinualError, ContinualState
    from lightning_merge.files.remote import redact
    from lightning_merge.strategies import Strategy

    try:
        if args.action == "init":
            spec = {"name": args.strategy, **_parse_set(args.set or [])}
            state = ContinualState.create(args.state, base=args.base, strategy=Strategy.from_dict(spec),
                                          on_missing=args.on_missing)
            print(redact(f"created continual state {state.url or state.path} ({args.strategy}, base {args.base})"))
        elif args.action == "add":
            state = ContinualState(args.state)
            entry = state.add(args.expert, name=args.name, allow_duplicate=args.allow_duplicate, force=args.force,
                              memory_budget=args.memory_budget)
            where = state.describe()["model"] if state.url else f"{args.state}/current/model"
            if entry.get("completed_interrupted_add"):
                print(redact(f"completed an interrupted add: '{entry['name']}' had been committed as expert "
                             f"{entry['order']} before its process stopped; merged model: {where}"))
            else:
                print(redact(f"added '{entry['name']}' as expert {entry['order']}; merged model: {where}"))
        else:
            info = ContinualState(args.state).describe()
            if args.json:
                print(redact(json.dumps(info, indent=2)))
                return 0
            print(redact(f"{info['path']}: {info['strategy']['name']} over {info['base']}, {info['count']} expert(s)"))
            print(redact(f"  merged model  {info['model']}"))
            for e in info["journal"]:
                print(redact(f"  {e['order']:>3}  {e['name']:<30} ‖τ‖={e['task_vector_norm']:.4g}  {e['time']}  "
                             f"{e['path']}"))
    except ContinualError as err:
        raise ValueError(str(err)) from err
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import importlib.util

    from lightning_merge.tools.diagnostics import report

    if importlib.util.find_spec("matplotlib") is None:  # before reading any expert: the figures need it
        raise ModuleNotFoundError("lightning-merge report draws its figures with matplotlib, which is not installed: "
                                  "pip install 'lightning-merge[report]' (or matplotlib)")
    strategy = None
    experts: list[Any] = list(args.experts)
    base: Any = args.base
    if args.recipe:
        from lightning_merge.tools.recipe import load_recipe

        if experts:
            raise ValueError("give either experts (with --base) or --recipe, not both")
        recipe = load_recipe(args.recipe, overrides=_parse_set(args.set), trust_checkpoint=args.trust_checkpoint)
        experts, base, strategy = recipe.experts, recipe.base, recipe.strategy
    elif args.strategy:
        from lightning_merge.strategies import Strategy

        strategy = Strategy.from_dict({"name": args.strategy, **_parse_set(args.set)})
    if not experts:
        raise ValueError("report needs experts (EXPERT... --base BASE) or --recipe RECIPE")
    if base is None:
        raise ValueError("report compares task vectors: pass --base (or a recipe with base_model)")
    result = report(experts, base, strategy, progress=False if args.no_progress else None)
    out = result.save(args.out, overwrite=args.overwrite)
    data = result.data
    n = len(data["experts"])
    mean_cos = (sum(sum(r) for r in data["cosine"]) - n) / max(n * (n - 1), 1)
    conflicts = [b["sign_conflict"] for b in data["blocks"].values()]
    print(f"wrote {out}/index.html: {n} experts, mean pairwise cosine {mean_cos:.3f}, sign conflicts "
          f"{min(conflicts):.1%}-{max(conflicts):.1%} per block")
    return 0


def cmd_extract_lora(args: argparse.Namespace) -> int:
    from lightning_merge.tools.extract_lora import extract_lora

    done = extract_lora(args.finetuned, args.base, args.out, args.rank, distribute_scale=args.distribute_scale,
                        embed_lora=args.embed_lora, save_modules=args.save_module, exclude=args.exclude_regex,
                        include=args.include_regex, sv_epsilon=args.sv_epsilon,
                        skip_undecomposable=args.skip_undecomposable, overwrite=args.overwrite,
                        trust_checkpoint=args.trust_checkpoint)
    worst = max(done.relative_error.values(), default=0.0)
    print(f"wrote {done.path}: {len(done.ranks)} modules at rank <= {args.rank} (largest relative error "
          f"{worst:.3g}), {len(done.modules_to_save)} saved whole", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lightning_merge.cli.demo import run_demo

    run_demo(out_dir=args.out, seed=args.seed, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lightning_merge._version import __version__

    parser = argparse.ArgumentParser(prog="lightning-merge", description="Merge models, curvature-aware.")
    parser.add_argument("--version", action="version", version=f"lightning-merge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does; tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge the models of a recipe (mergekit's YAML format)")
    m.add_argument("recipe", help="YAML recipe; model paths are relative to it")
    m.add_argument("out", help="output: a folder (sharded safetensors), a .safetensors file or a .ckpt file")
    m.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a strategy argument")
    m.add_argument("--dtype", help="output dtype (default: the recipe's out_dtype/dtype, else the base's)")
    m.add_argument("--include", action="append", metavar="GLOB", help="merge only these tensor names")
    m.add_argument("--exclude", action="append", metavar="GLOB", help="copy these tensor names from the base")
    m.add_argument("--on-missing", default="error", choices=["error", "union", "intersection", "base"])
    m.add_argument("--on-missing-statistic", default="error", choices=["error", "uniform"])
    m.add_argument("--output", choices=["peft"], default=None,
                   help="peft: write a PEFT LoRA adapter folder (the experts are LoRA adapters)")
    m.add_argument("--rank", type=int, default=None,
                   help="with --output peft: the SVD rank of the adapter (default: exact, for linear strategies)")
    m.add_argument("--shard-size", default=None, help="largest safetensors shard (default 5GB)")
    m.add_argument("--out-shard-size", default=None, metavar="N",
                   help="mergekit's spelling: the largest shard in bytes, with K/M/B for 10^3/10^6/10^9 (5B = 5e9)")
    m.add_argument("--threads", type=int, default=None, help="worker threads over tensors (default: up to 2)")
    m.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="bytes the tensor jobs running at once may hold, e.g. 512MB or 4GB (default 256MB); large "
                        "tensors of elementwise strategies are merged in row chunks within it, with the same output")
    m.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="split the merge over N processes on this machine (torch.distributed, gloo); the output is "
                        "bit-identical to one process. Under torchrun the launcher's processes are used")
    m.add_argument("--rendezvous-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="under torchrun: how long to wait for every rank to join (default 120)")
    m.add_argument("--overwrite", action="store_true", help="replace OUT once the new merge is complete")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--dry-run", action="store_true",
                   help="check and print the plan (tensors, experts, statistics, output size); merge nothing")
    m.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling .ckpt files that hold custom objects (runs code: trusted files only)")
    m.set_defaults(func=cmd_merge)

    i = sub.add_parser("inspect", help="what a model or statistics file holds")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)

    a = sub.add_parser("average", help="average Lightning checkpoints of one run (uniform, MWA, Fisher, OTA)")
    a.add_argument("checkpoints", nargs="+", help="the .ckpt files")
    a.add_argument("--out", required=True, help="the averaged .ckpt to write")
    a.add_argument("--weighting", default="uniform", choices=["uniform", "mwa", "fisher", "ota"])
    a.add_argument("--select", default="all", choices=["all", "top_k", "last"], help="choose among CHECKPOINTS")
    a.add_argument("-k", type=int, default=None, help="how many for --select top_k / last")
    a.add_argument("--mwa-by", default="metric", choices=["metric", "step"])
    a.add_argument("--p", type=float, default=1.0, help="MWA penalty exponent (0 = uniform)")
    a.add_argument("--mode", default="min", choices=["min", "max"], help="the monitored metric: minimised or maximised")
    a.add_argument("--source", default="state_dict", choices=["state_dict", "current_model_state"],
                   help="current_model_state: the raw weights of checkpoints written with WeightAveraging/EMA")
    a.add_argument("--include", action="append", metavar="GLOB")
    a.add_argument("--exclude", action="append", metavar="GLOB")
    a.add_argument("--weights-only", action="store_true", help="drop optimizer/loop state (default: keep the newest's)")
    a.add_argument("--on-missing-statistic", default="error", choices=["error", "uniform"])
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--dry-run", action="store_true", help="print the checkpoints and weights; average nothing")
    a.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling .ckpt files that hold custom objects (runs code: trusted files only)")
    a.set_defaults(func=cmd_average)

    c = sub.add_parser("continual", help="continual merging: init a state, add experts as they finish, show it")
    csub = c.add_subparsers(dest="action", required=True)
    ci = csub.add_parser("init", help="create a continual-merge state folder")
    ci.add_argument("state")
    ci.add_argument("--base", required=True, help="the base model every expert was fine-tuned from")
    ci.add_argument("--strategy", default="opcm",
                    help="a strategy with a continual form: opcm, dop, linear, task_arithmetic, dare, breadcrumbs, "
                         "cabs, generalized, fisher, ota, iso_c, ram, lines (the state refuses others, saying why)")
    ci.add_argument("--set", action="append", metavar="KEY=VALUE", help="a strategy argument")
    ci.add_argument("--on-missing", choices=["error", "base"], default="error",
                    help="an expert whose tensors are not the base's: 'error' refuses it (default); 'base' leaves its "
                         "extra tensors (a new head) out and counts a base tensor it lacks as unchanged")
    ca = csub.add_parser("add", help="fold an expert into the state (atomic; waits for a concurrent add)")
    ca.add_argument("state")
    ca.add_argument("expert")
    ca.add_argument("--name", default=None, help="the journal's name for it")
    ca.add_argument("--allow-duplicate", action="store_true", help="fold in an expert already merged")
    ca.add_argument("--force", action="store_true",
                    help="fold in an expert that looks unrelated to the base (a task vector 10x the others')")
    ca.add_argument("--memory-budget", default=None, metavar="SIZE",
                    help="bytes the tensors folded at once may hold, e.g. 512MB (default 256MB)")
    cs = csub.add_parser("show", help="the journal, norms and where the merged model is")
    cs.add_argument("state")
    cs.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_continual)

    e = sub.add_parser(
        "export-second-moments",
        help="write a capture's Adam second moments as exp_avg_sq.safetensors keyed by parameter name (OTA convention)",
    )
    e.add_argument("source", help="a sidecar, or the checkpoint/model it belongs to (a distributed checkpoint "
                                  "without a sidecar: its optimizer state)")
    e.add_argument("out", help="the .safetensors file to write")
    e.add_argument("--strip-prefix", default="", help="remove this prefix from names (e.g. model.)")
    e.add_argument("--bias-correct", action="store_true", help="write v/(1-beta2^t) instead of the raw exp_avg_sq")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier export")
    e.set_defaults(func=cmd_export_second_moments)

    r = sub.add_parser("report", help="diagnose experts (and a merge of them): an HTML report with figures")
    r.add_argument("experts", nargs="*", help="the experts (or give --recipe)")
    r.add_argument("--base", default=None, help="the base the experts were fine-tuned from")
    r.add_argument("--out", required=True, help="the folder to write (index.html, report.json, PNGs)")
    r.add_argument("--strategy", default=None, help="a strategy to diagnose (e.g. ties), arguments with --set")
    r.add_argument("--recipe", default=None, help="a recipe: its experts, base and strategy")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="a strategy argument")
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling .ckpt files that hold custom objects (runs code: trusted files only)")
    r.set_defaults(func=cmd_report)

    x = sub.add_parser("extract-lora", help="a PEFT LoRA adapter from a full fine-tune (mergekit-extract-lora)")
    x.add_argument("finetuned", help="the fine-tuned model (folder, .safetensors or .ckpt)")
    x.add_argument("out", help="the adapter folder to write")
    x.add_argument("--base", "--base-model", dest="base", required=True, help="the model it was fine-tuned from")
    x.add_argument("--rank", "--max-rank", dest="rank", type=int, default=128,
                   help="the largest rank K of a factored module (mergekit's --max-rank; default 128)")
    x.add_argument("--distribute-scale", action=argparse.BooleanOptionalAction, default=True,
                   help="A = sqrt(S) V^T and B = U sqrt(S) (default); --no-distribute-scale: A = S V^T, B = U")
    x.add_argument("--embed-lora", action=argparse.BooleanOptionalAction, default=False,
                   help="factor embeddings (lora_embedding_A/B) and LM heads instead of saving them whole")
    x.add_argument("--save-module", action="append", default=[], metavar="MODULE",
                   help="save this module whole (full name or last component such as lm_head; repeatable)")
    x.add_argument("-e", "--exclude-regex", action="append", default=[], metavar="REGEX",
                   help="leave out modules whose name matches (re.search; repeatable)")
    x.add_argument("-i", "--include-regex", action="append", default=[], metavar="REGEX",
                   help="factor or save only modules whose name matches one (repeatable)")
    x.add_argument("--sv-epsilon", type=float, default=0.0,
                   help="discard singular values at or below this; per-module ranks then vary (default 0: keep)")
    x.add_argument("--skip-undecomposable", action="store_true",
                   help="leave out norms and other modules that are not linear or embeddings (default: saved whole)")
    x.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier output")
    x.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling .ckpt files that hold custom objects (runs code: trusted files only)")
    x.set_defaults(func=cmd_extract_lora)

    d = sub.add_parser("demo", help="train small experts on scikit-learn's digits, merge them, print a table")
    d.add_argument("--out", default=None, help="keep the experts and merged models in this folder")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="fewer epochs (for tests)")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; every error is one line on stderr (``-v`` adds the traceback), exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BrokenPipeError:  # `lightning-merge ... | head`: the reader left; not an error of ours
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        print("lightning-merge: interrupted (nothing was committed)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place errors become a message
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"lightning-merge: error: {_one_line(err)}", file=sys.stderr)
        return 2


#: the longest error line printed: a value echoed from a file (a YAML-expanded list) must not fill the terminal
MAX_MESSAGE = 1000


def _one_line(err: BaseException) -> str:
    """The error as one line; the last line of defence against a URL's credentials or signature in a message."""
    from lightning_merge.files.remote import redact

    text = redact(" ".join(str(err).split()) or type(err).__name__)  # before the cut, which could split a URL
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE]}... (cut: {len(text):,} characters)"
    if isinstance(err, KeyError) and text.startswith(("'", '"')):
        text = text.strip("'\"")
    if isinstance(err, OSError) and err.filename:
        text = f"{err.strerror or text}: '{err.filename}'"
    if not isinstance(err, (ValueError, FileNotFoundError, FileExistsError, KeyError, OSError)):
        text = f"{type(err).__name__}: {text}"
    return redact(text)


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
