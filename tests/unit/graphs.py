"""Small traced graphs for the per-pass unit tests (single process, no collectives run)."""
import torch

from oases_fx.models import GPT, GPTConfig
from oases_fx.tracing import capture

TINY = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)


def traced_gpt(cfg=TINY, batch=2, seq=8):
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq))
    return model, capture(model, (idx, idx.clone()), {}), idx


def single_rank_group():
    """A 1-rank gloo group, so collectives can run in a unit test."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    return dist.group.WORLD


def run_module(module: str, arg: str, *, timeout: float = 900) -> dict:
    """`python -m module arg` in a fresh process (a process-wide fake group, or a clean dynamo state),
    with this checkout first on the path: the JSON of its last "RESULT {json}" line."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", module, arg], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])
