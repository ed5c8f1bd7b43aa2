"""A persistent pool of gloo ranks driven from the parent (pytest/hypothesis) process.

Hypothesis draws and shrinks in the parent; each example is one task that every rank runs.
Ranks stay up across examples (process start and gloo init are paid once per world size).
Tasks are top-level functions of tests.tasks, called as fn(rank, world_size, **kwargs); a failure
on any rank is re-raised in the parent with that rank's traceback.
"""
from __future__ import annotations

import os
import queue
import socket
import traceback

import torch.multiprocessing as mp

TASK_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, tasks, results, timeout_s=300):
    import datetime

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    import importlib

    while True:
        item = tasks.get()
        if item is None:
            break
        module, name, kwargs = item
        try:
            fn = getattr(importlib.import_module(module), name)
            results.put((rank, True, fn(rank, world_size, **kwargs)))
        except BaseException as e:  # report, keep serving
            results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class TaskFailed(Exception):
    def __init__(self, rank, text):
        super().__init__(f"rank {rank} failed:\n{text}")
        self.rank, self.text = rank, text


class RankPool:
    def __init__(self, world_size: int, timeout_s: float = 300):
        """`timeout_s`: the gloo process group's timeout (fault-injection pools use a short one)."""
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, port, self.tasks[r], self.results, timeout_s), daemon=True)
                      for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn, **kwargs):
        """Run tests.tasks-style fn on every rank; returns the list of per-rank results."""
        for q in self.tasks:
            q.put((fn.__module__, fn.__name__, kwargs))
        out = [None] * self.world_size
        errors = []
        for _ in range(self.world_size):
            try:
                rank, ok, value = self.results.get(timeout=TASK_TIMEOUT_S)
            except queue.Empty:
                self.close()
                raise RuntimeError(f"rank pool (world size {self.world_size}) timed out on {fn.__name__}")
            if ok:
                out[rank] = value
            else:
                errors.append((rank, value))
        if errors:
            rank, text = sorted(errors)[0]
            raise TaskFailed(rank, text)
        return out

    def close(self):
        for q in self.tasks:
            try:
                q.put(None)
            except Exception:
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
