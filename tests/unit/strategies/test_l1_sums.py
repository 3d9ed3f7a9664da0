"""The row L1 sums behind DARE's and DELLA's L1 rescale: exact, side-effect free, however rows are split."""

import torch

from lightning_merge.strategies import functional as F
from lightning_merge.strategies.della import Della


def test_row_l1_leaves_a_float64_input_unchanged():
    x = torch.tensor([[-1.0, 2.0], [3.0, -4.0]], dtype=torch.float64)
    before = x.clone()
    assert F.row_l1(x) == [3.0, 7.0]
    assert F.exact_l1(x) == 10.0
    assert torch.equal(x, before)


def test_della_l1_rescale_keeps_signs_of_float64_task_vectors():
    torch.manual_seed(0)
    base = torch.randn(8, 16)
    experts = [base + torch.randn(8, 16) * 0.1 for _ in range(2)]
    strategy = Della(density=0.5, epsilon=0.1)
    m32 = strategy.merge_tensor("w", base, experts, [{}, {}])
    m64 = strategy.merge_tensor("w", base.double(), [t.double() for t in experts], [{}, {}])
    torch.testing.assert_close(m64.float(), m32, rtol=1e-5, atol=1e-6)


def test_row_l1_of_one_row_is_the_rows_sum_in_the_whole_tensor_whatever_the_threads():
    # a row chunk of one row is one output: torch's parallel two-pass sum gave other floats than the row's sum in
    # the whole tensor (DARE/DELLA's L1 factors of a chunked merge then differed from the whole tensor's)
    torch.manual_seed(1)
    x = torch.randn(3, 2_000_003)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        whole = F.row_l1(x)
        assert [F.row_l1(x[i:i + 1])[0] for i in range(3)] == whole
        assert [F.row_l1(x[i])[0] for i in range(3)] == whole
        torch.set_num_threads(1)
        assert F.row_l1(x) == whole
    finally:
        torch.set_num_threads(threads)
