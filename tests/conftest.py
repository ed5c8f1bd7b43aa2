"""Shared fixtures: persistent gloo rank pools (one per world size) and hypothesis settings.

Hypothesis runs in the parent process; ranks only execute tasks (tests/tasks.py), so shrinking
never deadlocks a collective. The suite searches: every session draws a fresh seed (printed in
the header and the summary; replay a run with `--hypothesis-seed=N` or `OASES_FX_SEED=N`), and
each property runs OASES_FX_EXAMPLES (default 50) examples. The distributed properties draw their
shapes from a small per-session pool (tests.conftest.shape_pool, chosen by the seed), so ranks
compile few programs per session while weights, inputs and targets vary with every example.
"""
import collections
import os
import random

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=int(os.environ.get("OASES_FX_EXAMPLES", "50")), deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.load_profile("ci")

_pools = {}
_seed = []
EXAMPLES = collections.Counter()
"""Examples run per property (test name -> count), printed at the end of the session."""


def session_seed() -> int:
    """This session's hypothesis seed: --hypothesis-seed, else OASES_FX_SEED, else fresh."""
    if not _seed:
        env = os.environ.get("OASES_FX_SEED")
        _seed.append(int(env) if env else random.SystemRandom().randrange(2 ** 32))
    return _seed[0]


def shape_pool(name: str, shapes: list, size: int) -> list:
    """`size` of `shapes` (all of them if fewer), chosen by this session's seed and `name`: each
    session compiles a different few shapes, and a replayed seed compiles the same ones."""
    size = int(os.environ.get("OASES_FX_SHAPES", size))
    if len(shapes) <= size:
        return list(shapes)
    return random.Random(f"{session_seed()}:{name}").sample(list(shapes), size)


def _count_examples(item) -> None:
    """Wrap a @given test's inner test (hypothesis' documented `.hypothesis.inner_test` hook) so
    every example it runs (generated or shrunk) is counted under the test's name."""
    from hypothesis import is_hypothesis_test

    fn = getattr(item, "obj", None)
    if fn is None or not is_hypothesis_test(fn) or getattr(fn.hypothesis.inner_test, "_oases_counted", False):
        return
    inner, name = fn.hypothesis.inner_test, item.name

    def counted(*args, **kwargs):
        EXAMPLES[name] += 1
        return inner(*args, **kwargs)

    counted._oases_counted = True
    fn.hypothesis.inner_test = counted


def pytest_configure(config):
    from hypothesis import core

    given = config.getoption("--hypothesis-seed", default=None)
    if given is not None:
        _seed[:] = [int(given)]
    core.global_force_seed = session_seed()  # hypothesis' own --hypothesis-seed mechanism


def pytest_report_header(config):
    s = session_seed()
    return (f"hypothesis seed {s} (not derandomized; replay: python -m pytest ... --hypothesis-seed={s} "
            f"or OASES_FX_SEED={s})")


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    s = session_seed()
    tr.write_sep("-", f"hypothesis seed {s} (replay: --hypothesis-seed={s} or OASES_FX_SEED={s})")
    for name, n in sorted(EXAMPLES.items()):
        tr.write_line(f"hypothesis examples run: {n:4d}  {name}")


def get_pool(world_size: int):
    from tests.pool import RankPool

    if world_size not in _pools:
        _pools[world_size] = RankPool(world_size)
    return _pools[world_size]


@pytest.fixture(scope="session")
def pool2():
    return get_pool(2)


@pytest.fixture(scope="session")
def pool4():
    return get_pool(4)


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.extended` tests (the wide model zoo, long fault runs) are skipped unless
    OASES_FX_EXTENDED=1: CI runs the core suite; `OASES_FX_EXTENDED=1 python -m pytest tests -m extended`
    runs the rest."""
    for item in items:
        _count_examples(item)
    if os.environ.get("OASES_FX_EXTENDED") == "1":
        return
    skip = pytest.mark.skip(reason="extended suite: set OASES_FX_EXTENDED=1 to run")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    for p in _pools.values():
        p.close()
