"""The rounds of the sharded post-fit passes (:func:`shared_batches`), seen from one rank with the other rank's
broadcasts scripted: every rank's batches in the same order on every rank, each rank's share cut to its examples, and
the end only once every rank's share is read."""

from __future__ import annotations

import torch

from lightning_merge.capture.sharded_post_fit import shared_batches


def _batches(start: int, sizes: list[int]) -> list[torch.Tensor]:
    out, at = [], start
    for size in sizes:
        out.append(torch.arange(at, at + size))
        at += size
    return out


def test_rounds_hand_out_every_ranks_batches_in_order_until_every_share_is_read():
    mine = _batches(0, [4, 4, 4])  # rank 0: 6 examples asked, so 4 then 2 of the second batch, third unread
    theirs = iter([torch.arange(100, 104), None, None])  # rank 1: one batch, then nothing
    sent: list[tuple[int, object]] = []

    def share(payload, src):
        sent.append((src, payload))
        return payload if src == 0 else next(theirs)

    got = [(src, batch.tolist(), size) for src, batch, size in
           shared_batches(mine, 6, world=2, share=share, to_cpu=lambda b: b, transfer=lambda b: b)]
    assert got == [(0, [0, 1, 2, 3], 4), (1, [100, 101, 102, 103], 4), (0, [4, 5], 2)]
    assert [src for src, _ in sent] == [0, 1, 0, 1, 0, 1]  # three rounds: the last finds every share read
    assert sent[-2] == (0, None)


def test_a_rank_with_no_share_still_takes_part_in_every_round():
    theirs = iter([torch.arange(3), torch.arange(3, 5), None])
    calls = []

    def share(payload, src):
        calls.append(src)
        assert src == 1 or payload is None  # this rank has nothing to send
        return None if src == 0 else next(theirs)

    got = [batch.tolist() for _, batch, _ in
           shared_batches([], 8, world=2, share=share, to_cpu=lambda b: b, transfer=lambda b: b * 10)]
    assert got == [[0, 10, 20], [30, 40]]  # transferred on arrival
    assert calls == [0, 1, 0, 1, 0, 1]


def test_a_batch_is_broadcast_from_the_cpu_in_its_own_structure():
    from collections import namedtuple

    from lightning_merge.capture.sharded_post_fit import to_cpu

    pair = namedtuple("pair", "x y")
    batch = {"ids": torch.ones(2), "rest": [pair(torch.zeros(1), 3), (torch.ones(1),)], "name": "a"}
    moved = to_cpu(batch)
    assert isinstance(moved["rest"][0], pair) and moved["rest"][0].y == 3 and moved["name"] == "a"
    assert torch.equal(moved["ids"], batch["ids"]) and isinstance(moved["rest"][1], tuple)
