"""passes/graph_utils.module_path: the innermost module of a traced node (layers.Blocks and
moe.token_local_units find a node's block or experts module by it)."""
import torch
import torch.fx as fx
import torch.nn as nn

from oases_fx.passes.graph_utils import module_path
from oases_fx.tracing import capture


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList([_Inner(), _Inner()])

    def forward(self, x):
        return self.h[1](self.h[0](x)) * 2  # the product: the root module's own op


def test_module_path_is_the_innermost_module_or_none_at_the_root():
    gm = capture(_Outer(), (torch.randn(2, 4),), {}).gm
    paths = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            paths.setdefault(module_path(n), []).append(str(n.target))
    linears = {p for p, ts in paths.items() if any("linear" in t for t in ts)}
    assert linears == {"h.0.fc", "h.1.fc"}, paths  # the linear's own module, not the block above it
    assert any("relu" in t for t in paths["h.0"]) and any("relu" in t for t in paths["h.1"]), paths
    assert any("mul" in t for t in paths[None]), paths


def test_module_path_of_a_node_without_the_record_is_none():
    g = fx.Graph()
    n = g.placeholder("x")
    assert module_path(n) is None  # a node a pass added carries no nn_module_stack
    n.meta["nn_module_stack"] = {"L__self__": ("", nn.Module)}  # the root's entry: no path
    assert module_path(n) is None
