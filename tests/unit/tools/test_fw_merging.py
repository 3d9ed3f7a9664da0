"""FW-Merging: the oracle (least cosine with the gradient), the step schedules, the iterates staying in the convex hull
of the pool, the strategy handed to merge() (the same model), a Trainer fit (one process and ddp_spawn), refusals,
and FusionBench's FrankWolfeHardAlgorithm / FrankWolfeSoftAlgorithm run on the same tiny model and data (when a
fusion-bench environment is found)."""

from __future__ import annotations

import math

import pytest
import torch
from capture_helpers import RankInterleaved, trainer
from conftest import FUSION_BENCH, fusion_bench_runs, mlp_experts, tiny_mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge import LayerwiseTaskArithmetic, Linear, TaskArithmetic, merge
from lightning_merge.tools.adamerging import AdaMerging
from lightning_merge.tools.fw_merging import FWMerging

ITERS, SIZE, STEP, SCALE = 3, 4, 0.1, 0.3
ADA_ITERS, ADA_SIZE, ADA_BATCHES = 10, 8, 2  # the AdaMerging step: Adam steps, unlabelled batches per task


def _family(n=4, seed=0):
    """A base, n experts and two labelled tasks of ITERS * SIZE examples each."""
    base, experts, g = mlp_experts(n, seed)
    data = {t: (torch.randn(ITERS * SIZE, 6, generator=g), torch.randint(0, 3, (ITERS * SIZE,), generator=g))
            for t in ("a", "b")}
    return base, experts, data


def _batches(data, i):
    return {t: (x[i * SIZE:(i + 1) * SIZE], y[i * SIZE:(i + 1) * SIZE]) for t, (x, y) in data.items()}


def _run(fw, data, iterations=ITERS):
    for i in range(iterations):
        fw.step(_batches(data, i))
    return fw


def _cos(g, w):
    return float(torch.dot(g.flatten(), w.flatten()) / (g.norm() * w.norm()))


def test_the_start_is_task_arithmetic_or_the_base():
    base, experts, data = _family()
    hard = FWMerging(tiny_mlp(), experts, base)
    want = merge(experts, base, TaskArithmetic(scale=SCALE))
    for k, v in hard.merged_parameters().items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6)
    soft = FWMerging(tiny_mlp(), experts, base, mode="soft")
    assert torch.equal(soft.coefficient_matrix(), torch.zeros(4, 4))
    for k, v in soft.merged_parameters().items():
        torch.testing.assert_close(v, base[k])


def test_one_hard_iteration_moves_toward_the_checkpoint_of_least_cosine_with_the_gradient():
    """The oracle: argminₛ Σₗ cos(∇ₗf, sₗ) over the experts' weights and the initial model; θ ← θ + γ₀ (s − θ)."""
    base, experts, data = _family()
    fw = FWMerging(tiny_mlp(), experts, base)
    start = fw.merged_parameters()
    reference = tiny_mlp()
    reference.load_state_dict(start)
    loss = sum(nn.functional.cross_entropy(reference(x), y) for x, y in _batches(data, 0).values())
    grads = dict(zip([n for n, _ in reference.named_parameters()], torch.autograd.grad(loss, reference.parameters())))
    pool = [*experts, start]
    scores = [sum(_cos(grads[n], s[n]) for n in grads) for s in pool]
    chosen = fw.step(_batches(data, 0))
    assert chosen == min(range(len(pool)), key=scores.__getitem__)
    gamma = 2 / (0 + 2) * STEP * SCALE
    for n, v in fw.merged_parameters().items():
        torch.testing.assert_close(v, start[n] + gamma * (pool[chosen][n] - start[n]), rtol=1e-5, atol=1e-6)
    expected = torch.full((4, 4), SCALE * (1 - gamma))
    if chosen < 4:
        expected[chosen] += gamma
    else:
        expected += gamma * SCALE
    torch.testing.assert_close(fw.coefficient_matrix(), expected)


def test_the_hard_step_schedule_and_the_iterates_stay_in_the_convex_hull():
    """C_{t+1} = (1 − γₜ) Cₜ + γₜ S, γₜ = 2/(t+2) · step_size · scaling_factor, and each column stays a convex
    combination of the pool's: coefficients ≥ 0 summing to between the experts' 1 and the start's 4 · 0.3."""
    base, experts, data = _family()
    fw = FWMerging(tiny_mlp(), experts, base, granularity="layer")
    pool = fw.vertices()
    for t in range(ITERS):
        before = fw.coefficient_matrix()
        chosen = fw.step(_batches(data, t))
        gamma = 2 / (t + 2) * STEP * SCALE
        target = torch.stack([pool[chosen[n]][:, j] for j, n in enumerate(fw.names)], 1)
        torch.testing.assert_close(fw.coefficient_matrix(), (1 - gamma) * before + gamma * target)
        c = fw.coefficient_matrix()
        assert float(c.min()) >= 0 and 1 - 1e-6 <= float(c.sum(0).min()) <= float(c.sum(0).max()) <= 4 * SCALE + 1e-6


def test_soft_picks_distinct_experts_per_task_and_steps_with_eta():
    """Soft: each task's oracle skips the experts already chosen in the iteration; the first step is scaling_factor
    · Σⱼ (sⱼ − θ) (η₀ = 1), then ηₜ = 2/(t+2) · step_size."""
    base, experts, data = _family()
    fw = FWMerging(tiny_mlp(), experts, base, mode="soft")
    chosen = fw.step(_batches(data, 0))
    assert len(chosen) == 2 and chosen[0] != chosen[1]
    expected = torch.zeros(4, 4)
    for k in chosen:
        expected[k] += SCALE
    torch.testing.assert_close(fw.coefficient_matrix(), expected)
    before = fw.coefficient_matrix()
    chosen = fw.step(_batches(data, 1))
    eta = 2 / 3 * STEP
    target = sum(torch.eye(4)[k][:, None].expand(4, 4) for k in chosen)
    torch.testing.assert_close(fw.coefficient_matrix(), before + SCALE * eta * (target - 2 * before))


def test_a_trainer_runs_the_iterations_and_merge_writes_the_same_model(tmp_path):
    base, experts, data = _family()
    fw = FWMerging(tiny_mlp(), experts, base, granularity="layer", iterations=ITERS)
    loaders = {t: DataLoader(TensorDataset(x, y), batch_size=SIZE) for t, (x, y) in data.items()}
    trainer(tmp_path, [], max_epochs=-1).fit(fw, loaders)
    assert int(fw.iteration) == ITERS and len(fw.selections) == ITERS
    by_hand = _run(FWMerging(tiny_mlp(), experts, base, granularity="layer"), data)
    torch.testing.assert_close(fw.coefficient_matrix(), by_hand.coefficient_matrix())
    strategy = fw.strategy()
    assert isinstance(strategy, LayerwiseTaskArithmetic)
    written = merge(experts, base, strategy)
    for k, v in fw.merged_parameters().items():
        torch.testing.assert_close(written[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode,granularity,merge_fn", [("soft", "layer", "task_arithmetic"), ("hard", "layer", "ties"),
                                                       ("soft", "task", "adamerging")])
def test_ddp_spawn_chooses_what_one_process_chooses_on_the_same_global_batch(tmp_path, mode, granularity, merge_fn):
    """Two processes of SIZE / 2 examples per task (rank r reads examples r, r + 2...) average each task's gradient:
    the same choices at every iteration, and the same coefficients and merged weights, as one process on SIZE. Soft
    and layer-wise: one gradient reduced per task, and per-tensor choices (rank 0's half batch alone chooses
    otherwise). The choices come back from the spawned processes in the state dict, with the coefficients (the TIES
    iterate: a buffer). The gradients only choose, so the task-arithmetic and TIES steps give bitwise the same
    weights; the AdaMerging step learns λ from the averaged entropy gradients of the halves (float32 rounding)."""
    base, experts, data = _family()
    options = dict(mode=mode, granularity=granularity, merge_fn=merge_fn, iterations=ITERS, ada_iters=ADA_ITERS)
    single = FWMerging(tiny_mlp(), experts, base, **options)
    trainer(tmp_path / "one", [], max_epochs=-1).fit(
        single, {t: DataLoader(TensorDataset(x, y), batch_size=SIZE) for t, (x, y) in data.items()})
    ddp = FWMerging(tiny_mlp(), experts, base, **options)
    loaders = {t: DataLoader(TensorDataset(x, y), batch_size=SIZE // 2, sampler=RankInterleaved(len(x)))
               for t, (x, y) in data.items()}
    trainer(tmp_path / "ddp", [], max_epochs=-1, strategy="ddp_spawn", devices=2,
            use_distributed_sampler=False).fit(ddp, loaders)
    assert int(ddp.iteration) == ITERS and len(single.selections) == ITERS
    assert ddp.selections == single.selections
    exact = merge_fn != "adamerging"
    for k, v in ddp.merged_parameters().items():
        if exact:
            assert torch.equal(v, single.merged_parameters()[k]), k
        else:
            torch.testing.assert_close(v, single.merged_parameters()[k], rtol=1e-5, atol=1e-6)
    if merge_fn != "ties":
        if exact:
            assert torch.equal(ddp.coefficient_matrix(), single.coefficient_matrix())
        assert not torch.allclose(single.coefficient_matrix(), single.initial)


def test_entropy_loss_and_a_task_head(tmp_path):
    """loss='entropy' reads no labels; logits_fn gives each task its own head on the merged model."""
    base, experts, data = _family()
    heads = {"a": nn.Linear(3, 2), "b": nn.Linear(3, 5)}
    fw = FWMerging(tiny_mlp(), experts, base, loss="entropy", logits_fn=lambda fw, task, batch: heads[task](fw(batch)))
    x = data["a"][0][:SIZE]
    p = torch.softmax(heads["a"](fw(x)), -1)
    torch.testing.assert_close(fw.task_loss("a", x), -(p * torch.log(p + 1e-8)).sum(-1).mean())
    chosen = fw.step({t: x for t, (x, _) in _batches(data, 0).items()})
    assert 0 <= chosen <= 4


def test_refusals():
    base, experts, data = _family()
    with pytest.raises(ValueError, match="mode must be 'hard' or 'soft'"):
        FWMerging(tiny_mlp(), experts, base, mode="medium")
    with pytest.raises(ValueError, match="granularity must be 'task' or 'layer'"):
        FWMerging(tiny_mlp(), experts, base, granularity="tensor")
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        FWMerging(tiny_mlp(), experts, base, iterations=0)
    with pytest.raises(ValueError, match="step_size must be > 0"):
        FWMerging(tiny_mlp(), experts, base, step_size=0)
    with pytest.raises(ValueError, match="init must be"):
        FWMerging(tiny_mlp(), experts, base, init="ties")
    with pytest.raises(ValueError, match="loss must be"):
        FWMerging(tiny_mlp(), experts, base, loss="mse")
    with pytest.raises(ValueError, match="experts is empty"):
        FWMerging(tiny_mlp(), [], base)
    with pytest.raises(ValueError, match="FWMerging: expert .* has no tensor '2.bias'"):
        FWMerging(tiny_mlp(), [experts[0], {k: v for k, v in experts[1].items() if k != "2.bias"}], base)
    with pytest.raises(ValueError, match="needs labels"):
        FWMerging(tiny_mlp(), experts, base).step({"a": data["a"][0][:SIZE]})


FUSIONBENCH_SCRIPT = """
import contextlib, itertools, sys, torch
from torch import nn
from fusion_bench.method.fw_merging import FrankWolfeHardAlgorithm, FrankWolfeSoftAlgorithm
from fusion_bench.utils import state_dict_arithmetic as sda
d = torch.load(sys.argv[1], weights_only=True)
mode, granularity, merge_fn = sys.argv[3], sys.argv[4], sys.argv[5]
# this process runs other modules' reference scripts next: every patch below and the grad mode that run() leaves
# off are restored at the end
cuda, checked, grad = nn.Module.cuda, sda._validate_state_dict_same_keys, torch.is_grad_enabled()
nn.Module.cuda = lambda self, *a, **k: self  # CPU: FusionBench moves the merged model to CUDA
# 0.2.33's fw_merging adds state_dict(keep_vars=True) (Parameters) to Tensors, which this check refuses by type: the
# same check (keys, shapes, dtypes) with the Parameters read as Tensors
sda._validate_state_dict_same_keys = lambda sds: checked(
    [{k: v.data if isinstance(v, nn.Parameter) else v for k, v in sd.items()} for sd in sds])
def net(state):
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    m.load_state_dict(state)
    return m
class Pool:  # what run() asks of a model pool
    has_pretrained = True
    model_names = [str(k) for k in range(len(d["experts"]))]
    def load_model(self, name):
        return net(d["base"] if name == "_pretrained_" else d["experts"][int(name)])
# each task's examples one at a time, in order (FusionBench's loaders: batch size 1, shuffled)
samples = {t: itertools.cycle([(x[None], y[None]) for x, y in zip(*d["data"][t])]) for t in d["data"]}
if mode == "hard":
    alg = FrankWolfeHardAlgorithm(merge_fn=merge_fn, step_size=d["step_size"], max_iters=d["iters"],
                                  dataset_size=d["size"], tasks=list(d["data"]), granularity=granularity,
                                  loss_fn="cross_entropy", init_weight="", scaling_factor=d["scaling"],
                                  threshold=d["threshold"])
    alg.get_shuffled_loader_iter = lambda task: samples[task]
else:
    alg = FrankWolfeSoftAlgorithm(max_iters=d["iters"], dataset_size=d["size"], ada_iters=d["ada_iters"],
                                  ada_coeff=d["ada_coeff"], merge_fn=merge_fn, granularity=granularity,
                                  step_size=d["step_size"], tasks=list(d["data"]), init_weight="")
    alg.get_shuffled_train_loader_iter = lambda task: samples[task]
    # the AdaMerging step's unlabelled batches: each task's list of batches, in order, without end (FusionBench's: a
    # shuffled test loader of 16 images)
    ada = {t: itertools.cycle(batches) for t, batches in d["ada"].items()}
    alg.get_shuffled_test_loader_iter = lambda task, batch_size=16: ada[task]
    class Fabric:  # run_adamerging's fabric on one CPU process: no wrapping, a plain backward, no logger
        is_global_zero = True
        setup = staticmethod(lambda module, optimizer: (module, optimizer))
        backward = staticmethod(lambda loss: loss.backward())
        log_dict = staticmethod(lambda *a, **k: None)
    alg.fabric = Fabric()
alg.setup_zero_shot_classification_head = lambda: None  # CLIP's text heads: the tiny model has its own
alg.compute_logits = lambda model, x, task: model(x)
alg.log_hyperparams = lambda *a, **k: None
alg.profile = lambda name: contextlib.nullcontext()
chosen, select = [], alg.frank_wolfe_selection
def recording(*args, **kwargs):
    out = select(*args, **kwargs)
    chosen.append(out[1])
    return out
alg.frank_wolfe_selection = recording
try:
    merged = alg.run(Pool())
finally:
    nn.Module.cuda, sda._validate_state_dict_same_keys = cuda, checked
    torch.set_grad_enabled(grad)
torch.save({"merged": {k: v.detach() for k, v in merged.state_dict().items()}, "chosen": chosen}, sys.argv[2])
"""

CASES = [(mode, granularity, "task_arithmetic") for mode in ("hard", "soft") for granularity in ("task", "layer")]
STEP_CASES = [("hard", g, "ties") for g in ("task", "layer")] + [("soft", g, "adamerging") for g in ("task", "layer")]


def _ada_data(seed=5):
    """Each task's unlabelled batches (x,) for the AdaMerging step: ADA_BATCHES of ADA_SIZE examples."""
    g = torch.Generator().manual_seed(seed)
    return {t: [(torch.randn(ADA_SIZE, 6, generator=g),) for _ in range(ADA_BATCHES)] for t in ("a", "b")}


@pytest.fixture(scope="module")
def fw_references(tmp_path_factory):
    """FusionBench's FW-Merging runs of the family above, from one FusionBench process."""
    folder = tmp_path_factory.mktemp("fw_merging")
    base, experts, data = _family()
    torch.save({"base": base, "experts": experts, "data": data, "iters": ITERS, "size": SIZE, "step_size": STEP,
                "scaling": SCALE, "threshold": 20, "ada_iters": ADA_ITERS, "ada_coeff": 1e-8, "ada": _ada_data()},
               folder / "in.pt")
    cases = CASES + STEP_CASES
    fusion_bench_runs(FUSIONBENCH_SCRIPT, [[folder / "in.pt", folder / f"{m}-{g}-{f}.pt", m, g, f]
                                           for m, g, f in cases], folder)
    return {case: torch.load(folder / ("-".join(case) + ".pt"), weights_only=True) for case in cases}


def _names(chosen, n):
    """Our oracle's answers in FusionBench's names: the expert's name, 'initial' for the initial model."""
    if isinstance(chosen, dict):
        return {k: _names(v, n) for k, v in chosen.items()}
    return "initial" if chosen == n else str(chosen)


@pytest.mark.slow
@pytest.mark.skipif(FUSION_BENCH is None, reason="fusion-bench not installed (set FUSION_BENCH_PYTHON)")
@pytest.mark.parametrize("mode,granularity,merge_fn", CASES)
def test_matches_fusionbench_fw_merging(fw_references, mode, granularity, merge_fn):
    """FusionBench 0.2.33's run() (its gradients, oracle and steps) on 4 experts and 2 labelled tasks, 3 iterations of
    4 examples per task: the same choices, and merged weights within 1e-5."""
    base, experts, data = _family()
    reference = fw_references[(mode, granularity, merge_fn)]
    fw = _run(FWMerging(tiny_mlp(), experts, base, mode=mode, granularity=granularity, step_size=STEP,
                        scaling_factor=SCALE), data)
    chosen = [c for per_task in fw.selections for c in per_task] if mode == "soft" else fw.selections
    ours = [_names(c, 4) for c in chosen]
    assert ours == reference["chosen"]
    merged = merge(experts, base, fw.strategy())
    for k, v in reference["merged"].items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-5)
    assert not math.isclose(float((merged["2.weight"] - base["2.weight"]).norm()), 0.0)


def test_soft_with_as_many_tasks_as_experts_does_not_depend_on_the_data():
    """Every expert is chosen at every iteration, so θ₁ is task arithmetic at scaling_factor whatever the data."""
    base, experts, data = _family(n=2)
    other = {t: (-3 * x, (y + 1) % 3) for t, (x, y) in data.items()}
    first = _run(FWMerging(tiny_mlp(), experts, base, mode="soft"), data)
    second = _run(FWMerging(tiny_mlp(), experts, base, mode="soft"), other)
    torch.testing.assert_close(first.coefficient_matrix(), second.coefficient_matrix())
    once = FWMerging(tiny_mlp(), experts, base, mode="soft")
    once.step(_batches(data, 0))
    torch.testing.assert_close(once.coefficient_matrix(), torch.full((2, 4), SCALE))


def _ties_by_hand(point, checkpoints, scale, density=0.2):
    """FusionBench's ties_merge written out: each sⱼ − point flattened over the tensors in sorted order, entries with
    |x| ≥ its (d − ⌊d·density⌋)-th smallest |x| kept, the sign of the sum elected, the agreeing entries summed."""
    names = sorted(point)
    flat = torch.stack([torch.cat([(c[n] - point[n]).flatten() for n in names]) for c in checkpoints])
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    merged = (trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)).sum(0)
    out, start = {}, 0
    for n in names:
        out[n] = point[n] + scale * merged[start:start + point[n].numel()].view(point[n].shape)
        start += point[n].numel()
    return out


def test_the_ties_start_and_step_are_fusionbench_ties_merge_by_hand():
    """merge_fn='ties': θ starts at base + scaling_factor · TIES(τ₁..τ_N) (top ⌊0.2·d⌋ + 1 of each τ over the whole
    model, elected signs, agreeing entries summed); a hard step is θ + γ₀ · trim(s − θ)."""
    base, experts, data = _family()
    fw = FWMerging(tiny_mlp(), experts, base, merge_fn="ties")
    start = _ties_by_hand(base, experts, SCALE)
    for n, v in fw.merged_parameters().items():
        torch.testing.assert_close(v, start[n], rtol=1e-6, atol=1e-6)
    d = sum(v.numel() for v in base.values())
    assert int(fw.ties_density() * d) == int(0.2 * d) + 1  # what Ties keeps: FusionBench's count
    chosen = fw.step(_batches(data, 0))
    target = experts[chosen] if chosen < 4 else start
    want = _ties_by_hand(start, [target], 2 / (0 + 2) * STEP * SCALE)
    for n, v in fw.merged_parameters().items():
        torch.testing.assert_close(v, want[n], rtol=1e-6, atol=1e-6)
    moved = sum(int((v != start[n]).sum()) for n, v in fw.merged_parameters().items())
    assert moved == (int(0.2 * d) + 1 if chosen < 4 else 0)


def test_the_ties_step_at_density_1_without_sign_conflict_is_the_task_arithmetic_step():
    """Experts whose task vectors are positive multiples of one vector never disagree in sign; at density 1 nothing
    is trimmed, so the TIES start is task arithmetic and every TIES step the task-arithmetic step: the same choices
    and weights as merge_fn='task_arithmetic'."""
    base, _, data = _family()
    g = torch.Generator().manual_seed(3)
    direction = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    experts = [{k: v + c * direction[k] for k, v in base.items()} for c in (0.2, 0.5, 0.9, 1.3)]
    for granularity in ("task", "layer"):
        ties = _run(FWMerging(tiny_mlp(), experts, base, merge_fn="ties", density=1.0, granularity=granularity), data)
        plain = _run(FWMerging(tiny_mlp(), experts, base, granularity=granularity), data)
        assert ties.selections == plain.selections
        for n, v in plain.merged_parameters().items():
            torch.testing.assert_close(ties.merged_parameters()[n], v, rtol=1e-5, atol=1e-6)



def test_a_ties_step_builds_each_chosen_checkpoint_once_not_once_per_tensor():
    """The TIES step reads the chosen checkpoint's weights: built once per distinct chosen vertex, not once per
    merged tensor (each build is θ₀ + Σₖ sₖ τₖ over the whole model, so per tensor it costs tensors × the model)."""
    base, experts, data = _family()
    for granularity in ("task", "layer"):
        fw = FWMerging(tiny_mlp(), experts, base, merge_fn="ties", granularity=granularity)
        builds = []
        inner = fw.merger.merged_parameters

        def counted(coefficients=None, inner=inner, builds=builds):
            builds.append(coefficients)
            return inner(coefficients)

        fw.merger.merged_parameters = counted
        chosen = fw.step(_batches(data, 0))
        picks = set(chosen.values()) if isinstance(chosen, dict) else {chosen}
        vertices = len(experts) + 1  # the oracle reads every vertex once (the start is held, not built)
        assert len(builds) <= vertices + len(picks - {len(experts)}), granularity

def test_ties_results_are_a_state_not_a_strategy(tmp_path):
    """The TIES iterate has per-entry coefficients: strategy() and the coefficients refuse, and merged_state() is
    the network the module computes, written by merge() as the one expert of Linear(); a Trainer fit runs it."""
    base, experts, data = _family()
    fw = FWMerging(tiny_mlp(), experts, base, merge_fn="ties", iterations=ITERS)
    loaders = {t: DataLoader(TensorDataset(x, y), batch_size=SIZE) for t, (x, y) in data.items()}
    trainer(tmp_path, [], max_epochs=-1).fit(fw, loaders)
    by_hand = _run(FWMerging(tiny_mlp(), experts, base, merge_fn="ties"), data)
    assert fw.selections == by_hand.selections and len(fw.selections) == ITERS
    for what in (fw.strategy, fw.coefficients, fw.coefficient_matrix):
        with pytest.raises(ValueError, match="merge_fn='ties' trims each step per entry"):
            what()
    state = fw.merged_state()
    written = merge([state], None, Linear())
    x = data["a"][0]
    model = tiny_mlp()
    model.load_state_dict(written)
    torch.testing.assert_close(model(x), fw(x), rtol=1e-6, atol=1e-6)
    for n, v in by_hand.merged_parameters().items():
        torch.testing.assert_close(written[n], v, rtol=1e-6, atol=1e-6)


def test_the_adamerging_step_learns_what_adamerging_run_by_hand_learns(tmp_path):
    """Soft mode's first AdaMerging step from the base: the chosen experts' rows of C are the λ that AdaMerging
    (base, the chosen experts, λ = 0.3, Adam 1e-3) learns in ADA_ITERS Trainer steps on the summed entropy of the
    same batches; the second starts from λ = ada_coeff at the merged model: θ₂ = θ₁ + Σⱼ λⱼ (sⱼ − θ₁)."""
    base, experts, data = _family()
    ada_data = _ada_data()
    fw = FWMerging(tiny_mlp(), experts, base, mode="soft", merge_fn="adamerging", ada_iters=ADA_ITERS,
                   ada_data=ada_data)
    chosen = fw.step(_batches(data, 0))
    by_hand = AdaMerging(tiny_mlp(), [experts[k] for k in chosen], base, init=SCALE,
                         logits_fn=lambda ada, batch: {"a": ada(batch[0]), "b": ada(batch[1])})
    steps = [(ada_data["a"][i % ADA_BATCHES][0], ada_data["b"][i % ADA_BATCHES][0]) for i in range(ADA_ITERS)]
    trainer(tmp_path, [], max_steps=ADA_ITERS, max_epochs=-1).fit(by_hand, DataLoader(steps, batch_size=None))
    c = fw.coefficient_matrix()
    for j, k in enumerate(chosen):
        torch.testing.assert_close(c[k], by_hand.lambdas.detach()[j], rtol=1e-6, atol=1e-7)
    assert float(c.abs().sum()) == pytest.approx(float(c[chosen].abs().sum()))
    assert not torch.allclose(c[chosen], torch.full_like(c[chosen], SCALE))
    # the second iteration: λ from ada_coeff, over the merged model
    before = fw.merged_parameters()
    chosen = fw.step(_batches(data, 1))
    second = AdaMerging(tiny_mlp(), [experts[k] for k in chosen], before, init=1e-8,
                        logits_fn=lambda ada, batch: {"a": ada(batch[0]), "b": ada(batch[1])})
    steps = [(ada_data["a"][i % ADA_BATCHES][0], ada_data["b"][i % ADA_BATCHES][0])
             for i in range(ADA_ITERS, 2 * ADA_ITERS)]
    trainer(tmp_path / "2", [], max_steps=ADA_ITERS, max_epochs=-1).fit(second, DataLoader(steps, batch_size=None))
    for n, v in fw.merged_parameters().items():
        torch.testing.assert_close(v, second.merged_parameters()[n].detach(), rtol=1e-5, atol=1e-6)


def test_step_refusals():
    base, experts, data = _family()
    with pytest.raises(ValueError, match=r"merge_fn must be one of \('task_arithmetic', 'ties'\) in hard mode"):
        FWMerging(tiny_mlp(), experts, base, merge_fn="adamerging")
    with pytest.raises(ValueError, match=r"merge_fn must be one of \('task_arithmetic', 'adamerging'\) in soft"):
        FWMerging(tiny_mlp(), experts, base, mode="soft", merge_fn="ties")
    with pytest.raises(ValueError, match="density must be in"):
        FWMerging(tiny_mlp(), experts, base, merge_fn="ties", density=0)
    with pytest.raises(ValueError, match="ada_iters must be an integer >= 0"):
        FWMerging(tiny_mlp(), experts, base, mode="soft", merge_fn="adamerging", ada_iters=-1)
    with pytest.raises(ValueError, match="ada_lr must be > 0"):
        FWMerging(tiny_mlp(), experts, base, mode="soft", merge_fn="adamerging", ada_lr=0)
    with pytest.raises(ValueError, match="ada_data must be a non-empty mapping"):
        FWMerging(tiny_mlp(), experts, base, mode="soft", merge_fn="adamerging", ada_data={})
    fw = FWMerging(tiny_mlp(), experts, base, mode="soft", merge_fn="adamerging", ada_iters=1, ada_data={"a": []})
    with pytest.raises(ValueError, match=r"ada_data\['a'\] holds no batch"):
        fw.step(_batches(data, 0))


@pytest.mark.parametrize("argument", ["step_size", "scaling_factor", "ada_coeff", "ada_lr"])
@pytest.mark.parametrize("value", [math.inf, math.nan, True])
def test_non_finite_or_boolean_numbers_are_refused_at_construction(argument, value):
    """An infinite scaling_factor made the start NaN, an infinite step or learning rate, or a NaN ada_coeff, NaN
    iterates; a boolean read as 1 or 0: each is refused naming the argument, before anything runs."""
    base, experts, _ = _family()
    with pytest.raises(ValueError, match=f"FWMerging: {argument} must be a finite number"):
        FWMerging(tiny_mlp(), experts, base, mode="soft", merge_fn="adamerging", **{argument: value})


def test_numpy_numbers_are_accepted_as_their_python_values():
    """A sweep over numpy grids passes numpy scalars: they are numbers like Python's (booleans stay refused)."""
    import numpy as np

    base, experts, _ = _family()
    a = FWMerging(tiny_mlp(), experts, base, mode="soft", merge_fn="adamerging", iterations=np.int64(2),
                  ada_iters=np.int64(3), step_size=np.float32(0.5), ada_lr=np.float64(1e-3))
    b = FWMerging(tiny_mlp(), experts, base, mode="soft", merge_fn="adamerging", iterations=2, ada_iters=3,
                  step_size=0.5, ada_lr=1e-3)
    assert (a.iterations, a.ada_iters, a.step_size, a.ada_lr) == (b.iterations, b.ada_iters, b.step_size, b.ada_lr)
    with pytest.raises(ValueError, match="FWMerging: step_size must be a finite number"):
        FWMerging(tiny_mlp(), experts, base, mode="soft", merge_fn="adamerging", step_size=np.bool_(True))


@pytest.mark.slow
@pytest.mark.skipif(FUSION_BENCH is None, reason="fusion-bench not installed (set FUSION_BENCH_PYTHON)")
@pytest.mark.parametrize("mode,granularity,merge_fn", STEP_CASES)
def test_matches_fusionbench_ties_and_adamerging_steps(fw_references, mode, granularity, merge_fn):
    """FusionBench 0.2.33's run() with merge_fn 'ties' (hard: threshold 20, its TIES start and steps) and
    'adamerging' (soft: ADA_ITERS Adam steps per iteration on the same unlabelled batches, λ from 0.3 then 1e-8), on
    the family above: the same choices, and merged weights within 1e-5."""
    base, experts, data = _family()
    reference = fw_references[(mode, granularity, merge_fn)]
    fw = _run(FWMerging(tiny_mlp(), experts, base, mode=mode, merge_fn=merge_fn, granularity=granularity,
                        step_size=STEP, scaling_factor=SCALE, ada_iters=ADA_ITERS, ada_data=_ada_data()), data)
    chosen = [c for per_task in fw.selections for c in per_task] if mode == "soft" else fw.selections
    assert [_names(c, 4) for c in chosen] == reference["chosen"]
    merged = fw.merged_state() if merge_fn == "ties" else merge(experts, base, fw.strategy())
    worst = max(float((merged[k] - v).abs().max()) for k, v in reference["merged"].items())
    print(f"FW-Merging {mode}/{granularity}/{merge_fn} against FusionBench: max |Δ| = {worst:.2e}")
    for k, v in reference["merged"].items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged["2.weight"], base["2.weight"])


def test_the_ties_start_reads_the_experts_weights_tensor_by_tensor(monkeypatch):
    """init="ties" builds no expert's whole model (θ₀ + τₖ for every tensor at once): the merge reads each tensor as
    it needs it, so construction holds AdaMerging's copies plus the two of the docs (the iterate and the initial
    merge; measured 2026-12-07 on 48 tensors of 512², VmHWM: AdaMerging's + 2 model copies for 2 and 4 experts,
    where it was + N + 4). The start is unchanged."""
    base, experts, _ = _family()
    reference = FWMerging(tiny_mlp(), experts, base, merge_fn="ties")
    whole = []
    inner = AdaMerging.merged_parameters

    def counted(self, coefficients=None, names=None, rows=None):
        if names is None and coefficients is not None and bool(coefficients.ne(0).any()):
            whole.append(coefficients)
        return inner(self, coefficients, names, rows)

    monkeypatch.setattr(AdaMerging, "merged_parameters", counted)
    fw = FWMerging(tiny_mlp(), experts, base, merge_fn="ties")
    assert whole == []
    assert torch.equal(fw.point, reference.point) and torch.equal(fw.initial_point, reference.initial_point)


def test_a_missing_base_is_named():
    """base=None is refused with a message naming base (it was the Expert constructor's TypeError)."""
    _, experts, _ = _family()
    with pytest.raises(ValueError, match=r"FWMerging: base is None; pass the base model \(base=\.\.\.\)"):
        FWMerging(tiny_mlp(), experts, None)
    with pytest.raises(ValueError, match=r"AdaMerging: base is None"):
        AdaMerging(tiny_mlp(), experts, None)


def test_the_ties_state_written_over_the_base_folder_is_a_model_folder(tmp_path):
    """The documented route for a TIES result: ``merge([fw.merged_state()], base_folder, Linear(), out=...,
    dtype=<the base's>)`` writes the base folder's config.json beside the state's tensors in the base's dtype (without
    the base, the folder has no config.json and float32 tensors; without dtype, the float32 state and a bfloat16
    base are refused as different dtypes)."""
    import json

    from safetensors.torch import load_file

    from lightning_merge.files.safetensors import save_tensors

    base, experts, data = _family()
    folder = tmp_path / "base"
    folder.mkdir()
    save_tensors(folder / "model.safetensors", {k: v.to(torch.bfloat16) for k, v in base.items()})
    (folder / "config.json").write_text(json.dumps({"model_type": "mlp", "torch_dtype": "bfloat16"}))
    fw = _run(FWMerging(tiny_mlp(), experts, base, merge_fn="ties"), data, 1)
    state = fw.merged_state()
    merge([state], str(folder), Linear(), out=str(tmp_path / "fw-ties"), dtype="bfloat16")
    assert json.loads((tmp_path / "fw-ties" / "config.json").read_text())["model_type"] == "mlp"
    written = load_file(str(tmp_path / "fw-ties" / "model.safetensors"))
    assert set(written) == set(state)
    for n, v in state.items():
        assert written[n].dtype == torch.bfloat16 and torch.equal(written[n], v.to(torch.bfloat16)), n
    with pytest.raises(ValueError, match="different dtypes"):
        merge([state], str(folder), Linear(), out=str(tmp_path / "no-dtype"))


def test_a_vertex_read_in_row_chunks_builds_only_those_rows():
    """A merge reading a large tensor in row chunks reads a vertex's rows: each chunk is θ₀ + Σₖ sₖ τₖ on those
    rows alone (the same values as the whole tensor's rows), not the whole tensor built once per chunk."""
    from lightning_merge.tools.fw_merging import _VertexWeights

    base, experts, _ = _family()
    fw = FWMerging(tiny_mlp(), experts, base, merge_fn="ties")
    vertex = fw.vertices()[1]
    expert = _VertexWeights(fw, vertex)
    shapes = []
    inner = fw.merger.merged_parameters

    def recorded(coefficients=None, names=None, rows=None):
        out = inner(coefficients, names, rows)
        shapes.extend(tuple(t.shape) for t in out.values())
        return out

    fw.merger.merged_parameters = recorded
    for name in fw.names:
        whole = expert.tensor(name)
        rows = whole.shape[0]
        for start, stop in ((0, 1), (1, rows)):
            chunk = expert.tensor(name, rows=(start, stop))
            assert torch.equal(chunk, whole[start:stop])
            assert shapes[-1] == tuple(whole[start:stop].shape)
        torch.testing.assert_close(whole, base[name] + experts[1][name] - base[name], rtol=1e-6, atol=1e-6)
