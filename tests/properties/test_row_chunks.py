"""Memory by budget: a strategy that declares ``row_local`` gives, on any row range of its inputs, those rows of its
whole-tensor merge bit for bit; the engine's chunked merges (every output kind) equal its whole ones; the scheduler
keeps the running items within the budget and yields results in order."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import family
from hypothesis import given, settings
from hypothesis import strategies as st
from strategy_variants import VARIANTS, library_defaults

from lightning_merge import merge
from lightning_merge import strategies as S
from lightning_merge.engine.plan import plan_merge
from lightning_merge.engine.run import job_units, open_inputs
from lightning_merge.engine.schedule import CHUNK_FRACTION, bounded_map, chunk_limit, row_chunks
from lightning_merge.files.safetensors import SafetensorsFile, load_tensors, save_tensors
from lightning_merge.strategies import STRATEGIES

ROW_LOCAL = [s for s in library_defaults() + VARIANTS if s.row_local]


def test_the_declared_row_local_strategies():
    """What is declared, by name (a strategy whose rule reads a whole tensor must not be in this list)."""
    names = sorted({s.name for s in ROW_LOCAL})
    assert names == ["consensus", "fisher", "generalized", "layerwise_task_arithmetic", "linear", "lines",
                     "model_stock", "ota", "per_tensor", "ram", "task_arithmetic", "weighted_median"]
    assert not S.Ties().row_local and not S.OTA(density=0.5).row_local and not S.OTA(mean_normalize=True).row_local
    assert not S.LiNeS(inner=S.Ties()).row_local and S.LiNeS(inner=S.TaskArithmetic()).row_local
    assert not S.ModelStock().row_local and S.ModelStock(filter_wise=True).row_local


@pytest.fixture(scope="module")
def experts_of(tmp_path_factory):
    root = tmp_path_factory.mktemp("rows")
    cache = {}

    def get(n: int, shape: tuple[int, int]):
        if (n, shape) not in cache:
            base, paths = family(root / f"{n}-{shape[0]}x{shape[1]}", n=n, shape=shape)
            cache[n, shape] = (base, paths)
        return cache[n, shape]

    return get


@pytest.mark.parametrize("strategy", ROW_LOCAL, ids=[repr(s)[:60] for s in ROW_LOCAL])
@settings(max_examples=6, deadline=None)
@given(rows=st.integers(2, 40), cols=st.integers(1, 9), cuts=st.lists(st.integers(1, 39), max_size=4))
def test_a_row_local_merge_of_rows_is_those_rows_of_the_whole(experts_of, strategy, rows, cols, cuts):
    n = {"nearswap": 1}.get(strategy.name, 3)
    if strategy.name == "per_tensor":
        strategy = S.PerTensor(strategies=[S.TaskArithmetic(), S.Fisher(normalize=False)], default=1)
    if strategy.name in ("linear", "task_arithmetic", "fisher", "ota", "layerwise_task_arithmetic", "regmean") and \
            any(isinstance(getattr(strategy, f, None), list) for f in ("weights", "threshold", "default")):
        n = 2
    if strategy.name == "generalized" and isinstance(strategy.tall_lambda, list):
        n = 2
    base, paths = experts_of(n, (rows, cols))
    experts, b = open_inputs([str(p) for p in paths], str(base))
    plan = plan_merge(experts, b, strategy)
    prepared = plan.prepared
    whole = prepared.merge_tensor("w", plan.base_tensor("w"), plan.expert_tensors("w"), plan.stats("w"))
    bounds = sorted({0, rows, *[c for c in cuts if c < rows]})
    parts = [prepared.merge_tensor("w", plan.base_tensor("w", r), plan.expert_tensors("w", rows=r),
                                   plan.stats("w", r)) for r in zip(bounds, bounds[1:])]
    assert torch.equal(torch.cat(parts), whole)


def test_rows_are_read_from_their_bytes(tmp_path):
    x = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    save_tensors(tmp_path / "x.safetensors", {"x": x.to(torch.bfloat16), "v": torch.arange(5.0)})
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert torch.equal(f.get("x", (3, 7)), x[3:7].to(torch.bfloat16))
        assert f.get("x", (4, 4)).shape == (0, 6)
        with pytest.raises(ValueError, match=r"rows 8:11 are not within tensor 'x' of shape \[10, 6\]"):
            f.get("x", (8, 11))


def test_row_chunks_cover_the_rows_within_the_budget():
    assert row_chunks((100, 1000), 4.0, 10**9) == [(0, 100)]
    assert row_chunks((1000,), 4.0, 10) == [(0, 1000)]  # one dimension: never split
    chunks = row_chunks((1000, 1000), 40.0, 4_000_000)  # 40 kB a row: 100 rows a chunk
    assert chunks[0] == (0, 100) and chunks[-1] == (900, 1000) and len(chunks) == 10
    assert all(a == b for (_, a), (b, _) in zip(chunks, chunks[1:]))
    tiny = row_chunks((10_000, 4), 40.0, 1)  # a tiny budget: chunks of at least MIN_CHUNK_ELEMENTS elements
    assert tiny == [(0, 10_000)]


def test_a_chunk_costs_at_most_a_workers_share_and_an_eighth_of_the_budget():
    assert CHUNK_FRACTION == 8
    assert chunk_limit(192 << 20, 2) == 24 << 20  # the default budget: 24 MiB, not a worker's 96
    assert chunk_limit(192 << 20, 16) == 12 << 20  # many workers: each one's share
    assert chunk_limit(800, 1) == 100 and chunk_limit(7, 2) == 1  # never 0


def test_the_engine_splits_by_the_workers_share_into_chunks_of_the_chunk_limit(tmp_path):
    """Task arithmetic on 3 experts holds 11 float32 copies (44 bytes an element): a 4000 × 256 tensor costs
    45,056,000 bytes (11,264 a row). Within a 64,000,000-byte budget on 2 workers it is split (it costs more than a
    worker's 32,000,000) into chunks of at most the chunk limit, 8,000,000 bytes (710 rows): 6 equal chunks of 667
    rows but the last. A TIES tensor (a row pass: split only beyond the whole budget) runs whole within that budget,
    and within 40,000,000 bytes is split into chunks of at most 5,000,000 bytes (443 rows): 10 chunks of 400 rows."""
    base, paths = family(tmp_path / "fam", n=3, shape=(4000, 256), stats=False)
    experts, b = open_inputs([str(p) for p in paths], str(base))
    plan = plan_merge(experts, b, S.TaskArithmetic())
    units = [u for u in job_units(plan, plan.jobs, 64_000_000, 2) if u[0].name == "w"]
    assert [u[1] for u in units] == [(r, min(r + 667, 4000)) for r in range(0, 4000, 667)]
    assert [u[2] for u in units] == [667 * 11_264] * 5 + [665 * 11_264]
    assert chunk_limit(64_000_000, 2) == 8_000_000
    ties = plan_merge(experts, b, S.Ties(density=0.5))
    assert [(u[1], u[2]) for u in job_units(ties, ties.jobs, 64_000_000, 2) if u[0].name == "w"] == \
        [(None, 45_056_000)]
    small = [u for u in job_units(ties, ties.jobs, 40_000_000, 2) if u[0].name == "w"]
    assert [u[1] for u in small] == [(r, r + 400) for r in range(0, 4000, 400)]
    assert all(u[2] == 400 * 11_264 <= chunk_limit(40_000_000, 2) == 5_000_000 for u in small)


def test_the_scheduler_keeps_the_budget_and_the_order():
    held, peak, lock = [0], [0], threading.Lock()
    costs = [30, 50, 10, 100, 20, 60, 5, 40]

    def work(i: int) -> int:
        with lock:
            held[0] += costs[i]
            peak[0] = max(peak[0], held[0] if costs[i] <= 80 else 0)
        time.sleep(0.01 * (8 - i))
        with lock:
            held[0] -= costs[i]
        return i * i

    out = list(bounded_map(work, list(range(8)), costs, 80, workers=3))
    assert out == [i * i for i in range(8)]
    assert peak[0] <= 80  # 100 ran alone

    def fail(i: int) -> int:
        if i == 2:
            raise RuntimeError("boom at 2")
        return i

    with pytest.raises(RuntimeError, match="boom at 2"):
        list(bounded_map(fail, list(range(6)), [1] * 6, 10, workers=2))


@pytest.mark.parametrize("workers", [1, 2])
def test_the_memory_of_a_large_item_is_returned_after_it(monkeypatch, workers):
    """Only after the items of which two do not fit the budget (costing more than half of it: 100, 200 and 50 of
    80), before the next item starts; smaller items (row chunks) keep their memory for the next ones."""
    from lightning_merge.engine import schedule

    events: list[str] = []
    monkeypatch.setattr(schedule, "release_freed_memory", lambda: events.append("trim") or True)

    def work(i: int) -> int:
        events.append(f"start {i}")
        time.sleep(0.01)
        events.append(f"done {i}")
        return -i

    assert list(bounded_map(work, [0, 1, 2, 3, 4], [30, 100, 10, 200, 50], 80, workers=workers)) == [0, -1, -2, -3, -4]
    assert events == ["start 0", "done 0", "start 1", "done 1", "trim", "start 2", "done 2", "start 3", "done 3",
                      "trim", "start 4", "done 4", "trim"]


@pytest.mark.parametrize("strategy, shares", [(S.TaskArithmetic(), True), (S.Ties(), True), (S.Dare(), True),
                                              (S.TSVMerge(), False), (S.OPCM(), False)])
def test_a_merge_shares_the_threads_only_where_no_output_depends_on_them(monkeypatch, tmp_path, strategy, shares):
    """Row-local and row-pass strategies (every job entry by entry, or a copy) share the cores between the jobs
    running side by side; an SVD's jobs keep every thread."""
    from lightning_merge.engine import run

    asked = []
    real = run.bounded_map
    monkeypatch.setattr(run, "bounded_map", lambda *a, **k: asked.append(k["share_threads"]) or real(*a, **k))
    base, paths = family(tmp_path / "fam", n=2, shape=(8, 8), stats=False)
    merge([str(p) for p in paths], str(base), strategy)
    assert asked == [shares]


def test_memory_is_returned_on_glibc():
    import platform

    from lightning_merge.engine.schedule import release_freed_memory

    assert release_freed_memory() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("strategy", [S.TaskArithmetic(scale=0.7), S.Fisher(), S.Ties(density=0.5),
                                      S.Dare(drop_rate=0.5, seed=1), S.Dare(drop_rate=0.3, seed=2, rescale="l1"),
                                      S.Della(density=0.5, epsilon=0.1, seed=3, rescale="inverse"),
                                      S.Della(density=0.6, epsilon=0.2, seed=4, combine="linear")],
                         ids=["task_arithmetic", "fisher", "ties", "dare", "dare_l1", "della", "della_l1"])
def test_a_merge_within_a_small_budget_equals_the_default_bit_for_bit(tmp_path, strategy):
    """Every output kind (folder, file, state dict in bf16, module); the chunked jobs are really chunked."""
    base, paths = family(tmp_path / "fam", n=3, shape=(700, 129))
    inputs = [str(p) for p in paths]
    experts, b = open_inputs(inputs, str(base))
    plan = plan_merge(experts, b, strategy)
    units = job_units(plan, plan.jobs, 60_000, 2)
    assert (len([u for u in units if u[0].name == "w"]) > 1) == (strategy.row_local or strategy.row_pass)
    if strategy.row_pass:  # each chunk has its own prepared merge: its cuts, or where its draws start
        chunked = [u[3]["sparsify"] for u in units if u[0].name == "w" and u[3] is not None]
        assert len(chunked) == len([u for u in units if u[0].name == "w"])
        assert all("w" in {**c.get("cuts", {}), **c.get("starts", {})} for c in chunked)
    reference = merge(inputs, str(base), strategy)
    for budget in ("60KB", 1 << 30):
        folder = merge(inputs, str(base), strategy, tmp_path / f"out-{budget}", memory_budget=budget)
        got = load_tensors(folder / "model.safetensors")
        assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
        half = merge(inputs, str(base), strategy, dtype="bfloat16", memory_budget=budget)
        assert all(torch.equal(half[k], reference[k].to(torch.bfloat16)) for k in half)
        module = torch.nn.Module()
        module.register_buffer("w", torch.zeros(700, 129))
        module.register_buffer("b", torch.zeros(700))
        merge(inputs, str(base), strategy, module, memory_budget=budget)
        assert torch.equal(module.w, reference["w"]) and torch.equal(module.b, reference["b"])


def test_a_bad_budget_is_named():
    with pytest.raises(ValueError, match="memory_budget 'lots' is not a size"):
        merge([{"w": torch.ones(2)}], None, S.Linear(), memory_budget="lots")
    with pytest.raises(ValueError, match="memory_budget must be positive, got 0"):
        merge([{"w": torch.ones(2)}], None, S.Linear(), memory_budget=0)


def test_every_registered_strategy_is_in_the_variants():
    assert {s.name for s in library_defaults()} == {n for n, c in STRATEGIES.items()
                                                    if c.__module__.startswith("lightning_merge.")}


ROW_PASS = [s for s in library_defaults() + VARIANTS if s.row_pass]


def test_the_strategies_with_a_row_pass():
    assert sorted({s.name for s in ROW_PASS}) == ["dare", "della", "ties"]
    assert S.Ties().row_pass and not S.Ties(rescale="l1").row_pass and not S.Ties(topk="model").row_pass
    assert S.Dare().row_pass and S.Dare(rescale="l1").row_pass and S.Della().row_pass  # draws per chunk (issue 32)
    assert not S.Breadcrumbs().row_pass


@pytest.mark.parametrize("density", [0.3, 0.05, 1.0, 0.9999])
@settings(max_examples=8, deadline=None)
@given(rows=st.integers(2, 40), cols=st.integers(1, 9), cuts=st.lists(st.integers(1, 39), max_size=4),
       ties=st.booleans(), election=st.sampled_from(["weighted", "unweighted"]))
def test_ties_rows_after_the_row_pass_are_those_rows_of_the_whole(tmp_path_factory, density, rows, cols, cuts, ties,
                                                                   election):
    """Including ties at the threshold (values rounded to a coarse grid) and experts equal to the base there."""
    root = tmp_path_factory.mktemp("ties")
    g = torch.Generator().manual_seed(rows * 100 + cols)
    base = torch.randn(rows, cols, generator=g)
    experts = []
    for _ in range(3):
        tau = torch.randn(rows, cols, generator=g)
        if ties:
            tau = (tau * 2).round() / 2  # many entries share a magnitude
            tau[torch.rand(rows, cols, generator=g) < 0.3] = 0
        experts.append({"w": base + tau})
    save_tensors(root / "base.safetensors", {"w": base})
    for i, e in enumerate(experts):
        save_tensors(root / f"e{i}.safetensors", e)
    strategy = S.Ties(density=density, election=election)
    opened, b = open_inputs([str(root / f"e{i}.safetensors") for i in range(3)], str(root / "base.safetensors"))
    plan = plan_merge(opened, b, strategy)
    whole = plan.prepared.merge_tensor("w", plan.base_tensor("w"), plan.expert_tensors("w"), plan.stats("w"))
    bounds = sorted({0, rows, *[c for c in cuts if c < rows]})
    chunks = list(zip(bounds, bounds[1:]))
    prepared = strategy.prepare_rows(plan.prepared, plan, "w", chunks)
    parts = [p.merge_tensor("w", plan.base_tensor("w", r), plan.expert_tensors("w", rows=r), plan.stats("w", r))
             for p, r in zip(prepared, chunks)]
    assert torch.equal(torch.cat(parts), whole)


def test_experts_read_rows_from_every_source(tmp_path):
    """A safetensors file reads the rows' bytes; a composed expert (mergekit's slices) asks its part; a state dict
    slices; each gives the rows of the whole, and the fingerprint read by rows is the whole tensor's."""
    from lightning_merge.formats.sidecar import tensor_fingerprint
    from lightning_merge.sources.composed import ComposedExpert
    from lightning_merge.sources.expert import Expert

    x = torch.randn(300, 7)
    save_tensors(tmp_path / "a.safetensors", {"layers.3.w": x, "b": torch.randn(7)})
    file = Expert(str(tmp_path / "a.safetensors"))
    composed = ComposedExpert({"layers.0.w": (file, "layers.3.w")}, name="slice")
    in_memory = Expert({"layers.3.w": x})
    for expert, name in ((file, "layers.3.w"), (composed, "layers.0.w"), (in_memory, "layers.3.w")):
        assert torch.equal(expert.tensor(name, (17, 230)), x[17:230])
        assert torch.equal(expert.float32(name, (0, 1)), x[:1])
        assert expert.fingerprint(name) == tensor_fingerprint(x)
