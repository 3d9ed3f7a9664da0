"""Fixtures and factories shared by the suite (tests/unit, tests/integration, tests/properties).

Test modules import the factories with ``from conftest import ...`` (pytest puts this folder on ``sys.path``); the
modules of ``tests/helpers`` (Lightning modules for spawned workers, the doc world, reference scripts) are importable
by name through pyproject's ``pythonpath``. A process a test starts gets ``ROOT`` (the package) and ``HELPERS`` on its
``PYTHONPATH`` explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_merge.files.safetensors import save_tensors
from lightning_merge.formats.sidecar import write_statistics

ROOT = Path(__file__).resolve().parent.parent  # the repository: docs/, README.md, the package
HELPERS = Path(__file__).resolve().parent / "helpers"

#: what torch 2.13's gloo prints when it aborts at interpreter exit (tests/helpers/capture_helpers.py)
GLOO_EXIT_ABORT = "terminate called without an active exception"


def run_sharded_script(command: list[str], output: Path, **kwargs):
    """``subprocess.run(command, capture_output=True, text=True, **kwargs)`` for a script that runs a 2-process
    sharded (ModelParallelStrategy) fit, run once more, ``output`` emptied first, if it died by SIGABRT with gloo's
    exit message. torch 2.13's gloo aborts that way now and then at interpreter exit, after the work is done and the
    process group destroyed (capture_helpers.close_process_group); seen in a full CI run on the distcp fit, which no
    lightning-merge code runs in. Any other failure, or a second abort, is returned as it is."""
    import shutil
    import signal
    import subprocess

    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode == -signal.SIGABRT and GLOO_EXIT_ABORT in done.stderr:
        for item in output.iterdir() if output.is_dir() else ():
            shutil.rmtree(item) if item.is_dir() else item.unlink()
        done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    return done


#: FusionBench's Python (its own environment: ``.ci/run`` builds ``.venv-fusionbench``; or ``FUSION_BENCH_PYTHON``),
#: which the parity tests run their reference scripts with; None where it is not installed (those tests skip)
FUSION_BENCH = next((c for c in (os.environ.get("FUSION_BENCH_PYTHON"),
                                 str(ROOT / ".venv-fusionbench" / "bin" / "python")) if c and Path(c).exists()), None)

#: one process per reference environment (FusionBench's, mergekit's) and test process, started at the first reference
#: asked for (importing fusion_bench costs about 9 s a process on 2 cores, mergekit about 5, and a dozen modules ask).
#: It reads jobs (a script, its argument lists, a folder) a line each on stdin, runs the script once per argument list
#: as ``python script *argv`` would (its own ``sys.argv``, fresh globals, torch's, Python's and NumPy's global seeds
#: and torch's grad mode reset as in a fresh process), and answers each job on a line that starts with a marker, so
#: that a script's own output is skipped.
_SERVER = r"""
import contextlib, json, os, random, sys, traceback
import numpy, torch
seed = torch.initial_seed()
marker = sys.argv[1]
for line in sys.stdin:
    job = json.loads(line)
    try:
        code = compile(open(job["script"]).read(), job["script"], "exec")
        os.chdir(job["cwd"])
        for argv in job["runs"]:
            sys.argv = [job["script"], *argv]
            torch.manual_seed(seed)
            torch.set_grad_enabled(True)  # a reference that ends inside no_grad's state (FusionBench's run() leaves it)
            random.seed()
            numpy.random.seed()
            with contextlib.redirect_stdout(sys.stderr):
                exec(code, {"__name__": "__main__", "__file__": job["script"]})
        reply = {"ok": True}
    except BaseException:
        reply = {"ok": False, "error": traceback.format_exc()}
    print(marker + json.dumps(reply), flush=True)
"""
_servers: dict = {}


def fusion_bench_runs(script: str | Path, runs: list[list], cwd: Path) -> None:
    """Run a FusionBench reference ``script`` (its source text, or a file) once per argument list in ``runs``, in
    ``cwd``, in this test process's FusionBench process: what each ``python script *argv`` would do.

    Raises:
        AssertionError: the script failed (its traceback and the process's recent output are in the message).
    """
    reference_runs(FUSION_BENCH, script, runs, cwd)


def reference_runs(python: str | Path, script: str | Path, runs: list[list], cwd: Path) -> None:
    """:func:`fusion_bench_runs` in the environment of the interpreter ``python`` (mergekit's, FusionBench's)."""
    import atexit
    import json
    import subprocess
    import tempfile

    if not isinstance(script, Path):
        path = Path(cwd) / "reference_script.py"
        path.write_text(script)
        script = path
    server = _servers.setdefault(str(python), {})
    if "process" not in server or server["process"].poll() is not None:
        log = tempfile.TemporaryFile("w+")  # the process's output, for the message of a failing script
        marker = "@@lightning-merge-reference@@"
        process = subprocess.Popen([str(python), "-c", _SERVER, marker], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=log, text=True, cwd=cwd,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})  # local paths only, never the Hub
        atexit.register(process.kill)
        server.update(process=process, log=log, marker=marker)
    process, marker = server["process"], server["marker"]
    job = {"script": str(Path(script).resolve()), "cwd": str(Path(cwd).resolve()),
           "runs": [[str(a) for a in argv] for argv in runs]}
    process.stdin.write(json.dumps(job) + "\n")
    process.stdin.flush()
    for line in process.stdout:
        if line.startswith(marker):
            reply = json.loads(line[len(marker):])
            break
    else:
        reply = {"ok": False, "error": f"the reference process ended (exit status {process.wait()})"}
    if not reply["ok"]:
        server["log"].seek(0)
        raise AssertionError(f"the reference {script} failed in {python}:\n{reply['error']}\n"
                             f"its output:\n{server['log'].read()[-4000:]}")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def tiny_mlp() -> torch.nn.Module:
    """The 6 → 8 → 3 MLP of the data-using tools' tests (AdaMerging, FW-Merging)."""
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def mlp_experts(n: int, seed: int) -> tuple[dict, list[dict], torch.Generator]:
    """:func:`tiny_mlp`'s state dict (torch seeded with ``seed``), ``n`` experts = base + 0.5 noise, and the generator
    that drew the noise, for the test's data to be drawn next."""
    torch.manual_seed(seed)
    base = tiny_mlp().state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    experts = [{k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, experts, g


def make_models(n: int = 3, seed: int = 0, scale: float = 0.1, dtype=torch.float32):
    """A small base state dict and ``n`` experts = base + noise (with an integer buffer left equal)."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "layers.0.weight": torch.randn(16, 8, generator=g),
        "layers.0.bias": torch.randn(16, generator=g),
        "layers.1.weight": torch.randn(4, 16, generator=g),
        "position_ids": torch.arange(5),
    }
    experts = []
    for _ in range(n):
        experts.append(
            {
                k: (v + scale * torch.randn(v.shape, generator=g)).to(dtype) if v.is_floating_point() else v.clone()
                for k, v in base.items()
            }
        )
    base = {k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}
    return base, experts


def family(root: Path, n: int = 2, shape=(4, 4), seed: int = 0, stats: bool = True) -> tuple[Path, list[Path]]:
    """A base ``root/base.safetensors`` (tensors ``w`` of ``shape`` and ``b``) and ``n`` experts
    ``root/e{i}.safetensors`` = base + 0.1·noise, each with a sidecar holding Fisher and Adam second moments unless
    ``stats`` is false. Returns ``(base, expert paths)``."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(shape, generator=g), "b": torch.randn(shape[0], generator=g)}
    save_tensors(root / "base.safetensors", base)
    paths = []
    for i in range(n):
        path = root / f"e{i}.safetensors"
        save_tensors(path, {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()})
        if stats:
            write_statistics(root / f"e{i}.statistics.safetensors",
                             {"fisher.example": {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in base.items()},
                              "exp_avg_sq": {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in base.items()}},
                             {"fisher.example": {"count": 4}, "exp_avg_sq": {"beta2": 0.999, "step": 10}})
        paths.append(path)
    return root / "base.safetensors", paths


def recipe(root: Path, models: list[Path], base: Path | None = None, extra: str = "") -> Path:
    """A mergekit recipe ``root/recipe.yaml``: a linear merge of ``models`` (weight 1 each), ``extra`` lines added."""
    text = "merge_method: linear\n" + (f"base_model: {base}\n" if base else "") + extra + "models:\n" + "".join(
        f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in models)
    (root / "recipe.yaml").write_text(text)
    return root / "recipe.yaml"


def one_line(capsys) -> str:
    """The command line's error: exactly one line on stderr, ``lightning-merge: error: ...``, no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lightning-merge: error: ") and "Traceback" not in err[0], err
    return err[0]


def state_dicts(shapes: dict[str, tuple[int, ...]], n: int = 3, seed: int = 0
                ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A random base state dict of ``shapes`` and ``n`` experts, each the base plus N(0, 0.1²) noise."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    experts = [{k: v + 0.1 * torch.randn(*v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, experts


def rand(*shape, seed=0):
    """A standard normal tensor of ``shape`` drawn from its own generator seeded with ``seed``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def write_family(tmp_path, n=4, stats=True):
    """The continual tests' family: a base with three float tensors and an integer buffer ``steps``, ``n`` experts
    = base + 0.3·noise (the buffer equal), each with a sidecar (``fisher.batch`` and ``exp_avg_sq``) unless
    ``stats`` is false. Returns ``(base path, expert paths)``."""
    base = {
        "layer.0.weight": rand(6, 5, seed=1),
        "layer.0.bias": rand(6, seed=2),
        "embed.weight": rand(7, 5, seed=3),
        "steps": torch.tensor([3]),
    }
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i in range(n):
        expert = {
            k: (v + 0.3 * rand(*v.shape, seed=10 * i + j) if v.is_floating_point() else v)
            for j, (k, v) in enumerate(base.items())
        }
        path = tmp_path / f"e{i}.safetensors"
        save_file(expert, str(path))
        if stats:
            floats = [k for k in base if base[k].is_floating_point()]
            write_statistics(
                tmp_path / f"e{i}.statistics.safetensors",
                {
                    "fisher.batch": {
                        k: rand(*base[k].shape, seed=100 + 10 * i + j).abs() + 0.05 for j, k in enumerate(floats)
                    },
                    "exp_avg_sq": {
                        k: rand(*base[k].shape, seed=200 + 10 * i + j).abs() + 0.05 for j, k in enumerate(floats)
                    },
                },
                {"fisher.batch": {"count": 5, "batch_size": 4}, "exp_avg_sq": {"beta2": 0.999, "step": 100}},
            )
        paths.append(path)
    return tmp_path / "base.safetensors", paths


def tiny_base(tmp_path):
    """``tmp_path/tiny-base.safetensors``: the weights of a fresh ``capture_helpers.Tiny`` (a base for callbacks)."""
    from capture_helpers import Tiny

    base = tmp_path / "tiny-base.safetensors"
    save_file({k: v.contiguous() for k, v in Tiny(lr=5e-2).state_dict().items()}, str(base))
    return base


def write_lora_family(root, n: int = 3, each=None):
    """A tiny Llama base (``root/base``) and ``n`` LoRA adapters over it (``root/a{i}``; different ranks and target
    modules, random factors). ``each(folder, generator)`` runs after each adapter is saved (to add statistics).
    Returns ``(base folder, adapter folders)``."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    targets = (["q_proj", "v_proj"], ["q_proj", "down_proj"], ["v_proj", "o_proj"])
    g = torch.Generator().manual_seed(1)
    paths = []
    for i in range(n):
        torch.manual_seed(10 + i)
        model = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(
            r=2 + i, lora_alpha=4, target_modules=targets[i % len(targets)], init_lora_weights=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.3, generator=g)
        folder = root / f"a{i}"
        model.save_pretrained(folder)
        if each is not None:
            each(folder, g)
        paths.append(folder)
    return root / "base", paths


@pytest.fixture(scope="session")
def _moto_server():
    """A real S3-compatible server (moto's server mode) for the object-storage tests, started once."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{server._server.server_port}"
    server.stop()


@pytest.fixture
def s3(_moto_server, monkeypatch, tmp_path):
    """A fresh bucket on the moto server; returns its URL ``s3://NAME``. The environment points s3fs (in this process
    and in processes it spawns) at the server, and the fetch cache at a fresh folder."""
    import uuid

    import s3fs

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": _moto_server, "LIGHTNING_MERGE_CACHE": str(tmp_path / "cache"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"lm-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=_moto_server).mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()
