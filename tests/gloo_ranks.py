"""Run a list of checks on two gloo ranks (CPU processes) and report each check's outcome.

One pair of processes runs every check in order (spawning costs seconds); each rank writes
``"ok"`` or its traceback per check. Every collective runs under the process group's
timeout and the processes under a join timeout, so a broken check fails instead of hanging.
After a failure the ranks stop together: their collectives are out of step.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
Check = Callable[[int], None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_of(data, rank):
    # Unequal shards: rank 0 holds batches of 5 and 3 rows, rank 1 one batch of 2.
    return data[:2] if rank == 0 else data[2:]


def _worker(rank: int, port: int, out_dir: str, checks: Sequence[Check],
            collective_timeout_s: float) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=collective_timeout_s))
    try:
        for check in checks:
            try:
                check(rank)
                status = "ok"
            except BaseException:
                status = traceback.format_exc()
            with open(os.path.join(out_dir, f"{check.__name__}.rank{rank}.txt"), "w") as f:
                f.write(status)
            flag = torch.tensor([float(status != "ok")])
            dist.all_reduce(flag)
            if flag.item():
                break
    finally:
        dist.destroy_process_group()


def run_checks(out: Path, checks: Sequence[Check], *, collective_timeout_s: float,
               join_timeout_s: float) -> list[int]:
    """Run ``checks`` on ``WORLD`` ranks writing outcomes under ``out``; the hung ranks."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker,
                         args=(r, port, str(out), list(checks), collective_timeout_s))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=join_timeout_s)
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return hung


def assert_check_ok(out: Path, hung: list[int], check: str) -> None:
    assert not hung, f"rank(s) {hung} hung"
    for r in range(WORLD):
        path = out / f"{check}.rank{r}.txt"
        assert path.exists(), f"rank {r} never ran {check} (an earlier check failed)"
        status = path.read_text()
        assert status == "ok", f"rank {r}:\n{status}"
