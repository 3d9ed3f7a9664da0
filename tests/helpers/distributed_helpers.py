"""Workers of the distributed-merge tests (importable by spawned processes)."""

from __future__ import annotations

import json


def merge_rank(rank: int, world_size: int, spec: str) -> None:
    """Run ``merge(..., group="world")`` with the arguments in ``spec`` (JSON: experts, base, strategy, out...)."""
    from lightning_merge import Strategy, merge

    args = json.loads(spec)
    strategy = Strategy.from_dict(args.pop("strategy"))
    fail_on = args.pop("fail_on", None)
    if fail_on is not None:  # merging that tensor raises, on whichever rank owns it
        import lightning_merge.engine.run as engine

        real = engine.compute

        def compute(plan, job, dtype=None, rows=None, prepared=None):
            if job.name == fail_on:
                raise RuntimeError(f"boom on {job.name} at rank {rank}")
            return real(plan, job, dtype, rows, prepared)

        engine.compute = compute
    merge(args.pop("experts"), args.pop("base"), strategy, args.pop("out"), group="world", **args)
