"""The parts CurvatureCapture is built from: its settings (one frozen, validated CaptureConfig that the callback's
signature mirrors), sharding detected by type (never by a class name), and the adapter folder paths."""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path

import pytest
import torch
from capture_helpers import Tiny, loader, trainer
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from torch import nn

from lightning_merge.callbacks import CurvatureCapture
from lightning_merge.capture.config import CaptureConfig
from lightning_merge.capture.sharding import holds_dtensors, is_dtensor, sharding
from lightning_merge.formats.adapter import adapter_path, rename_meta


def test_the_callback_signature_is_the_config_and_its_settings_read_from_it():
    parameters = list(inspect.signature(CurvatureCapture.__init__).parameters.values())[1:]
    fields = dataclasses.fields(CaptureConfig)
    assert [p.name for p in parameters] == [f.name for f in fields]
    assert [p.default for p in parameters] == [f.default for f in fields]
    documented = inspect.getdoc(CurvatureCapture)
    assert all(f"    {f.name}: " in documented for f in fields)  # every argument is documented

    capture = CurvatureCapture(fisher=False, fisher_examples=7, gram="after_fit", gram_form="lowrank", gram_rank=3)
    assert capture.config == CaptureConfig(fisher=False, fisher_examples=7, gram="after_fit", gram_form="lowrank",
                                           gram_rank=3)
    assert (capture.fisher, capture.fisher_examples, capture.gram, capture.gram_rank) == (False, 7, "after_fit", 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        capture.config.fisher = True  # type: ignore[misc]
    with pytest.raises(AttributeError):
        capture.fisher = True  # the settings are the config's: validated once, never changed behind it


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(second_moments=False, fisher=False), "CurvatureCapture records nothing"),
        (dict(gram="eval"), "gram must be 'train', 'after_fit' or None, got 'eval'"),
        (dict(gram_form="sparse"), "gram_form must be one of full, diagonal, lowrank, got 'sparse'"),
        (dict(gram_rank=True), "gram_rank must be an integer >= 1, got True"),
        (dict(loss_reduction="max"), "loss_reduction must be one of auto, example_mean, token_mean, sum"),
        (dict(fisher_start_step=-1), "fisher_start_step must be >= 0, got -1"),
        (dict(fisher_every_n_steps=0), "fisher_every_n_steps must be >= 1, got 0"),
        (dict(fisher_ema_decay=1.0), r"fisher_ema_decay must be in \(0, 1\) or None, got 1.0"),
        (dict(fisher_after_fit="sampled"), "fisher_after_fit must be one of example, true, exact or None"),
        (dict(fisher_loader="dev"), "fisher_loader must be one of val, train, test or an iterable of batches"),
        (dict(fisher_examples=0), "fisher_examples must be >= 1, got 0"),
        (dict(fisher_samples=0), "fisher_samples must be >= 1, got 0"),
        (dict(compression="int8"), "compression must be one of float32, bfloat16, rank1, got 'int8'"),
        (dict(save_final="adapters"), "save_final must be True, False, 'full' or 'adapter', got 'adapters'"),
    ],
)
def test_each_bad_setting_is_refused_with_the_same_message_from_the_callback_and_the_config(settings, message):
    for build in (CurvatureCapture, CaptureConfig):
        with pytest.raises(ValueError, match=message):
            build(**settings)


def test_the_final_folder_is_dirpath_then_the_checkpoint_folder_then_the_root():
    assert CaptureConfig(dirpath="out").final_dir("ckpt", "root") == "out"
    assert CaptureConfig().final_dir("ckpt", "root") == "ckpt"
    assert CaptureConfig().final_dir(None, "root") == "root"
    assert CaptureConfig(save_final="full").writes_full_model(peft=True)
    assert not CaptureConfig().writes_full_model(peft=True) and CaptureConfig().writes_full_model(peft=False)


class NotFSDPStrategy(SingleDeviceStrategy):
    """A one-device strategy whose name says FSDP: nothing is sharded."""


class Sharded(FSDPStrategy):
    """Lightning's FSDP under another name."""


@pytest.fixture
def process_group(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_sharding_is_read_from_types_not_class_names():
    assert sharding(nn.Linear(2, 2)) is None
    assert sharding(nn.Linear(2, 2), NotFSDPStrategy(device=torch.device("cpu"))) is None
    assert sharding(nn.Linear(2, 2), DDPStrategy()) is None
    assert sharding(nn.Linear(2, 2), Sharded()) == "fsdp1"  # wraps the module from outside: the strategy says it


def test_sharding_of_fsdp1_fsdp2_and_dtensor_modules(process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    wrapped = FullyShardedDataParallel(nn.Sequential(nn.Linear(4, 4)), device_id=torch.device("cpu"))
    assert sharding(wrapped) == "fsdp1" and sharding(nn.Sequential(wrapped, nn.Linear(4, 2))) == "fsdp1"
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    fully_shard(model, mesh=process_group)
    assert sharding(model) == "fsdp2"
    parallel = nn.Linear(4, 4)
    parallel.weight = nn.Parameter(distribute_tensor(parallel.weight.data, process_group, [Shard(0)]))
    assert sharding(parallel) == "dtensor"
    # the capture works on DTensor shards for fsdp2 and dtensor, never for fsdp1 or an unsharded module
    assert holds_dtensors(model) and holds_dtensors(parallel)
    assert not holds_dtensors(wrapped) and not holds_dtensors(nn.Linear(4, 4))
    assert is_dtensor(parallel.weight) and not is_dtensor(parallel.bias) and not is_dtensor(wrapped)
    assert holds_dtensors(model, Sharded()) is False  # Lightning's FSDPStrategy: FSDP1 whatever the module


def test_a_strategy_named_like_fsdp_is_not_refused_the_batch_fisher(tmp_path):
    capture = CurvatureCapture(save_final=False)
    trainer(tmp_path, [capture], strategy=NotFSDPStrategy(device=torch.device("cpu")), max_epochs=1).fit(
        Tiny(), loader()
    )
    assert capture.finalize().get("net.0.weight", "fisher.batch").shape == (5, 4)


def test_adapter_paths_and_renamed_metadata():
    assert adapter_path(os.path.join("run", "epoch=1.ckpt")) == Path("run", "epoch=1.adapter")
    assert adapter_path("s3://bucket/run/last.ckpt") == "s3://bucket/run/last.adapter"
    meta = {"estimator": "adam", "beta2": {"a": 0.9, "b": 0.99}, "step": 3, "count": {"a": 1, "c": 2}}
    assert rename_meta(meta, {"a": "A", "b": "B"}) == {"estimator": "adam", "beta2": {"A": 0.9, "B": 0.99},
                                                       "step": 3, "count": {"A": 1}}


def test_deepspeed_is_refused_in_setup_with_what_to_do_instead():
    """DeepSpeed cannot be installed or run here (it needs CUDA); a capture under it is refused before training
    with the supported alternatives, told by class name without importing deepspeed."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    from lightning_merge.callbacks import CurvatureCapture
    from lightning_merge.capture.sharding import is_deepspeed

    class Mine(DeepSpeedStrategy):  # a user's subclass
        pass

    strategy = object.__new__(Mine)  # DeepSpeedStrategy() itself needs the package
    assert is_deepspeed(strategy) and not is_deepspeed(DDPStrategy())
    with pytest.raises(ValueError, match="DeepSpeedStrategy.*FSDP2.*zero_to_fp32.py"):
        CurvatureCapture().setup(SimpleNamespace(strategy=strategy), nn.Linear(2, 2), "fit")
