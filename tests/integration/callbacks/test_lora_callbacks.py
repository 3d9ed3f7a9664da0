"""Every callback on a LoRA fine-tune, the way docs/lora.md shows it (issue 30): a tiny Llama with PEFT LoRA inside a
LightningModule that defines no ``forward``, token tasks with a token-mean loss and -100 padding."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from capture_helpers import CountSteps  # noqa: E402
from lora_runs import LoraLM, lora_run, lora_trainer, save_base, task_loader  # noqa: E402

from lightning_merge.callbacks import CurvatureCapture  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base and two finished LoRA runs on other tasks (adapter folders with statistics, last.ckpt + sidecar)."""
    root = tmp_path_factory.mktemp("lora-world")
    base = save_base(root / "base")
    runs = [lora_run(root / f"run{t}", base, t, seed=t) for t in (1, 2)]
    return base, runs


# -- item 2: the post-fit passes call what a causal-LM wrapper exposes ------------------------------------------------


def test_post_fit_fisher_calls_the_wrapped_peft_model_of_a_module_without_forward(world, tmp_path):
    from lightning_merge.capture.fisher import compute_fisher

    base, _ = world
    loader = task_loader(0, 4, 1, seed=7)
    capture = CurvatureCapture(fisher_after_fit="example", fisher_loader=loader, fisher_examples=4,
                               save_final=False)
    module = LoraLM(base)
    lora_trainer(tmp_path, [capture], max_steps=3).fit(module, task_loader(0))
    stats = capture.finalize()
    # the reference: the per-example Fisher of the PEFT model itself (which has a forward), at the trained weights
    names = [n for n, p in module.model.named_parameters() if p.requires_grad]
    sums, count = compute_fisher(module.model, task_loader(0, 4, 1, seed=7), estimator="example", num_examples=4,
                                 names=names)
    assert count == 4 and len(stats.names("fisher", "example")) == len(names) == 8  # 2 layers x q, v x A, B
    for name in names:
        torch.testing.assert_close(stats.get(f"model.{name}", "fisher", "example"), sums[name] / count,
                                   rtol=1e-4, atol=1e-10)


class TwoModels(LoraLM):
    def __init__(self, base):
        super().__init__(base)
        self.teacher = transformers.LlamaForCausalLM.from_pretrained(str(base))


class NoModel(LoraLM):
    def __init__(self, base):
        super().__init__(base)
        self.inner = torch.nn.ModuleDict({"lm": self.model})
        del self.model


@pytest.mark.parametrize("cls, held", [(TwoModels, "holds 2 Hugging Face / PEFT models (model, teacher)"),
                                       (NoModel, "wraps no Hugging Face / PEFT model")])
@pytest.mark.parametrize("setting", [{"fisher_after_fit": "example"}, {"gram": "after_fit"}])
def test_a_module_the_post_fit_pass_cannot_call_is_refused_before_training(world, tmp_path, cls, held, setting):
    base, _ = world
    steps = CountSteps()
    capture = CurvatureCapture(fisher_loader="train", **setting)
    with pytest.raises(ValueError, match="defines neither `forward` nor `fisher_logits`") as err:
        lora_trainer(tmp_path, [capture, steps], max_steps=2).fit(cls(base), task_loader(0))
    assert held in str(err.value) and "fisher_logits(self, batch)" in str(err.value)
    assert steps.batches == 0


def test_post_fit_gram_calls_the_wrapped_model(world, tmp_path):
    base, _ = world
    capture = CurvatureCapture(second_moments=False, fisher=False, gram="after_fit", fisher_loader="train",
                               fisher_examples=4, save_final=False)
    lora_trainer(tmp_path, [capture], max_steps=2).fit(LoraLM(base), task_loader(0))
    stats = capture.finalize()
    names = stats.names("gram")
    assert len(names) == 8 and all(".lora_" in n for n in names)  # the trained linears: lora_A and lora_B
    for name in names:
        assert stats.get(name, "gram").abs().sum() > 0
