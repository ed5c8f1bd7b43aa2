"""schedule_overlap on hand-built graphs: the exact Oases order, bitwise-identical values, bounds.

Graphs are traced with make_fx from small functions that call the functional collectives on a
1-process gloo group (an all-reduce over one rank is the identity, so values are checkable), plus
one forward/backward pair captured from torch.compile through AOTAutograd.
"""
import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from oases_fx import meta as oases_meta
from oases_fx import timeline
from oases_fx.passes import schedule_overlap as so
from oases_fx.timeline import TableCostModel, Timeline, is_collective, is_wait, peak_live_bytes


ScheduleOptions, schedule_overlap_pass = so.ScheduleOptions, so.schedule_overlap_pass
c10d = torch.ops._c10d_functional


@pytest.fixture(scope="module")
def group_name():
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield dist.group.WORLD.group_name
    if created:
        dist.destroy_process_group()


def _all_reduce(x, gn):
    return c10d.wait_tensor(c10d.all_reduce(x, "sum", gn))


def _chains_sequential(gn, num_chains, depth):
    """Chains one after another: chain c = depth x (relu -> mm -> all_reduce -> wait)."""
    def f(*args):
        xs, ws = args[:num_chains], args[num_chains:]
        outs = []
        for x in xs:
            h = x
            for w in ws:
                h = _all_reduce(torch.relu(h) @ w, gn)
            outs.append(h)
        return torch.cat(outs)
    return f


def _chains_interleaved(gn, num_chains, depth):
    """The same computation, traced block by block across chains."""
    def f(*args):
        hs, ws = list(args[:num_chains]), args[num_chains:]
        for w in ws:
            hs = [_all_reduce(torch.relu(h) @ w, gn) for h in hs]
        return torch.cat(hs)
    return f


def _inputs(num_chains, depth, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(4, 8, generator=g) for _ in range(num_chains)]
            + [torch.randn(8, 8, generator=g) for _ in range(depth)])


def _trace(f, args):
    return make_fx(f)(*args)


def _names(gm):
    return [n.name for n in gm.graph.nodes if n.op == "call_function"]


def _labels(gm, num_chains):
    """Each call_function node as "<chain><block> <kind>": chain from the input it descends
    from (A, B, ...), block = number of all-reduces before it in its chain."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][:num_chains]
    chain, block = {}, {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            chain[n] = "ABCDEFGH"[placeholders.index(n)] if n in placeholders else None
            block[n] = 0
            continue
        ins = n.all_input_nodes
        cs = {chain[a] for a in ins if chain.get(a)}
        chain[n] = cs.pop() if len(cs) == 1 else None
        block[n] = max((block[a] + (1 if is_collective(a) else 0) for a in ins), default=0)
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or chain[n] is None:
            continue
        kind = "ar" if is_collective(n) else "wait" if is_wait(n) else str(n.target).split(".")[1]
        b = block[n] - 1 if is_wait(n) else block[n]
        out.append(f"{chain[n]}{b} {kind}")
    return out


# The Oases order for two chains of three blocks: each collective has the other chain's block
# between its issue and its wait; only A0's compute and the last all-reduce are exposed.
OASES_K2_DEPTH3 = [
    "A0 relu", "A0 mm", "A0 ar",
    "B0 relu", "B0 mm", "B0 ar",
    "A0 wait", "A1 relu", "A1 mm", "A1 ar",
    "B0 wait", "B1 relu", "B1 mm", "B1 ar",
    "A1 wait", "A2 relu", "A2 mm", "A2 ar",
    "B1 wait", "B2 relu", "B2 mm", "B2 ar",
    "A2 wait", "B2 wait",
]


@pytest.mark.parametrize("builder", [_chains_sequential, _chains_interleaved])
def test_two_chains_get_the_oases_order(group_name, builder):
    args = _inputs(2, 3)
    gm = _trace(builder(group_name, 2, 3), args)
    schedule_overlap_pass(gm, options=ScheduleOptions())
    assert _labels(gm, 2) == OASES_K2_DEPTH3
    assert _names(gm)[-1] == "cat"


def test_exact_node_order_sequential_input(group_name):
    # The same order by node name, for the graph as make_fx emits it (A's blocks, then B's):
    # A = relu/mm/all_reduce/wait_tensor{,_1,_2}, B = {_3,_4,_5}.
    gm = _trace(_chains_sequential(group_name, 2, 3), _inputs(2, 3))
    schedule_overlap_pass(gm, options=ScheduleOptions())
    assert _names(gm) == [
        "relu", "mm", "all_reduce",
        "relu_3", "mm_3", "all_reduce_3",
        "wait_tensor", "relu_1", "mm_1", "all_reduce_1",
        "wait_tensor_3", "relu_4", "mm_4", "all_reduce_4",
        "wait_tensor_1", "relu_2", "mm_2", "all_reduce_2",
        "wait_tensor_4", "relu_5", "mm_5", "all_reduce_5",
        "wait_tensor_2", "wait_tensor_5", "cat",
    ]


def _other_chain_compute_between_issue_and_wait(gm, num_chains):
    labels = _labels(gm, num_chains)
    hidden = []
    for i, lab in enumerate(labels):
        if not lab.endswith(" ar"):
            continue
        j = labels.index(lab.replace(" ar", " wait"))
        between = labels[i + 1:j]
        hidden.append(any(x.endswith(" mm") and x[0] != lab[0] for x in between))
    return hidden


def test_order_holds_when_communication_is_cheap(group_name):
    # Comm far cheaper than compute: the interleave still happens (a wait right after its
    # collective would stall, however briefly); the overlap does not depend on the cost ratio.
    gm = _trace(_chains_sequential(group_name, 2, 3), _inputs(2, 3))
    compute = {n.name: 100.0 for n in gm.graph.nodes if n.op == "call_function"}
    comm = {n.name: 1.0 for n in gm.graph.nodes if is_collective(n)}
    schedule_overlap_pass(gm, options=ScheduleOptions(), cost_model=TableCostModel(compute=compute, comm=comm))
    assert _labels(gm, 2) == OASES_K2_DEPTH3
    t = gm.meta["oases_timeline"]
    assert t.comm_exposed_us == pytest.approx(1.0)  # only the last all-reduce


def test_only_last_collective_is_exposed_with_real_costs(group_name):
    gm = _trace(_chains_sequential(group_name, 2, 3), _inputs(2, 3))
    compute = {n.name: (50.0 if "mm" in n.name else 5.0) for n in gm.graph.nodes if n.op == "call_function"}
    comm = {n.name: 40.0 for n in gm.graph.nodes if is_collective(n)}
    before = _trace(_chains_sequential(group_name, 2, 3), _inputs(2, 3))
    cm = TableCostModel(compute=compute, comm=comm)
    schedule_overlap_pass(gm, options=ScheduleOptions(), cost_model=cm)
    assert _other_chain_compute_between_issue_and_wait(gm, 2) == [True] * 5 + [False]
    t = gm.meta["oases_timeline"]
    assert t.comm_exposed_us == pytest.approx(40.0)  # the last all-reduce
    from oases_fx.timeline import simulate
    assert simulate(list(before.graph.nodes), cm).comm_exposed_us == pytest.approx(240.0)


def test_values_bitwise_identical(group_name):
    args = _inputs(2, 3)
    gm = _trace(_chains_sequential(group_name, 2, 3), args)
    before = gm(*args)
    order_before = _names(gm)
    schedule_overlap_pass(gm, options=ScheduleOptions())
    assert _names(gm) != order_before  # it did reorder
    after = gm(*args)
    assert torch.equal(before, after)


def test_graph_lints_and_every_node_is_timed(group_name):
    gm = _trace(_chains_sequential(group_name, 2, 3), _inputs(2, 3))
    schedule_overlap_pass(gm, options=ScheduleOptions())
    gm.graph.lint()
    t = gm.meta["oases_timeline"]
    assert isinstance(t, Timeline)
    assert t.comm_exposed_us + t.comm_hidden_us == pytest.approx(t.comm_total_us)
    for n in gm.graph.nodes:
        if n.op == "call_function":
            rec = oases_meta.get(n)
            assert rec.stream == ("comm" if is_collective(n) else "compute"), n.name
            assert rec.start_us is not None and rec.end_us >= rec.start_us, n.name


def test_single_chain_keeps_a_valid_order(group_name):
    args = _inputs(1, 3)
    gm = _trace(_chains_sequential(group_name, 1, 3), args)
    order_before = _names(gm)
    ref = gm(*args)
    schedule_overlap_pass(gm, options=ScheduleOptions())
    gm.graph.lint()
    # Nothing independent to overlap with: every wait is already just before its first use.
    assert _names(gm) == order_before
    assert torch.equal(gm(*args), ref)


@pytest.mark.parametrize("max_in_flight", [1, 2, 3])
def test_in_flight_bound_holds(group_name, max_in_flight):
    args = _inputs(4, 3)
    gm = _trace(_chains_sequential(group_name, 4, 3), args)
    ref = gm(*args)
    schedule_overlap_pass(gm, options=ScheduleOptions(max_in_flight=max_in_flight))
    in_flight, peak = set(), 0
    for n in gm.graph.nodes:
        if is_collective(n):
            in_flight.add(n)
        elif is_wait(n):
            in_flight.discard(n.args[0])
        peak = max(peak, len(in_flight))
    assert peak == max_in_flight  # reached, never exceeded (4 independent chains)
    assert torch.equal(gm(*args), ref)


def test_deterministic(group_name):
    orders = []
    for _ in range(2):
        gm = _trace(_chains_sequential(group_name, 3, 3), _inputs(3, 3))
        schedule_overlap_pass(gm, options=ScheduleOptions())
        orders.append(_names(gm))
    assert orders[0] == orders[1]


def test_no_collectives_unchanged():
    def f(x, w1, w2):
        a = torch.relu(x @ w1)
        b = torch.sigmoid(x @ w2)
        return a + b, a * b
    args = (torch.randn(4, 8), torch.randn(8, 8), torch.randn(8, 8))
    gm = make_fx(f)(*args)
    before = [n.name for n in gm.graph.nodes]
    code_before = gm.code
    schedule_overlap_pass(gm, options=ScheduleOptions())
    assert [n.name for n in gm.graph.nodes] == before
    assert gm.code == code_before
    assert gm.meta["oases_timeline"].comm_total_us == 0.0


def test_disabled_is_a_no_op(group_name):
    gm = _trace(_chains_sequential(group_name, 2, 2), _inputs(2, 2))
    before = _names(gm)
    schedule_overlap_pass(gm, options=ScheduleOptions(enabled=False))
    assert _names(gm) == before and "oases_timeline" not in gm.meta


def test_rng_ops_and_mutations_keep_their_order(group_name):
    # B's dropout needs no collective, so the scheduler would like to run it while A's
    # all-reduce is in flight, before A's dropout; both draw from the global generator, so
    # their original order (A's first) must hold, and B's chain waits (the documented cost of
    # copies traced one after another). The in-place add into an input is a barrier.
    aten = torch.ops.aten

    def f(xa, xb, w, out):
        ha = _all_reduce(_all_reduce(xa @ w, group_name) @ w, group_name)
        ha = aten.native_dropout(ha, 0.5, True)[0]
        hb = aten.native_dropout(xb, 0.5, True)[0]
        hb = _all_reduce(_all_reduce(hb @ w, group_name) @ w, group_name)
        y = torch.cat([ha, hb])
        out.add_(1.0)
        return y
    args = [torch.randn(4, 8), torch.randn(4, 8), torch.randn(8, 8), torch.zeros(3)]
    gm = make_fx(f)(*args)
    rng = [n.name for n in gm.graph.nodes if n.op == "call_function"
           and torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())]
    assert rng == ["native_dropout", "native_dropout_1"]
    torch.manual_seed(0)
    ref = gm(*[a.clone() for a in args])
    schedule_overlap_pass(gm, options=ScheduleOptions())
    names = _names(gm)
    assert names.index("native_dropout") < names.index("native_dropout_1")
    assert names[-1] == "add_"  # the mutation stays after everything that came before it
    torch.manual_seed(0)
    assert torch.equal(gm(*[a.clone() for a in args]), ref)


def test_ordering_classes():
    aten = torch.ops.aten

    def f(q, x, out):
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q)  # dropout_p = 0
        b = aten.native_dropout(x, 0.1, True)
        c = aten.native_dropout(x, 0.1, False)
        out.add_(1.0)
        return a, b, c, torch.rand(3), torch.bernoulli(x.sigmoid())
    gm = make_fx(f)(torch.randn(1, 2, 4, 8), torch.randn(4), torch.zeros(3))
    cls = [(str(n.target), n.args[2] if "native_dropout" in str(n.target) else None, so._ordering_class(n))
           for n in gm.graph.nodes if n.op == "call_function" and "getitem" not in str(n.target)]
    assert ("aten.native_dropout.default", True, so.ORDERED) in cls   # draws random numbers
    assert ("aten.native_dropout.default", False, so.PURE) in cls     # eval mode: draws nothing
    assert ("aten.rand.default", None, so.ORDERED) in cls
    assert ("aten.bernoulli.default", None, so.ORDERED) in cls
    assert ("aten.add_.Tensor", None, so.BARRIER) in cls
    assert ("aten.sigmoid.default", None, so.PURE) in cls
    attention = [c for c in cls if "attention" in c[0]]
    assert attention and all(c[2] == so.PURE for c in attention)     # dropout_p == 0


def test_memory_bound_is_respected(group_name):
    # Each chain ends in a sum, so the original order holds one chain's activations at a time
    # and interleaving the chains holds two: the bound must bind.
    def f(xa, xb, w1, w2):
        outs = []
        for x in (xa, xb):
            h = x
            for w in (w1, w2):
                h = _all_reduce(torch.relu(h) @ w, group_name)
            outs.append(h.sum())
        return torch.stack(outs)
    args = _inputs(2, 2)
    free = _trace(f, args)
    peak_before = peak_live_bytes(list(free.graph.nodes))
    schedule_overlap_pass(free, options=ScheduleOptions())
    assert peak_live_bytes(list(free.graph.nodes)) > peak_before  # unbounded: more memory

    gm = _trace(f, args)
    ref = gm(*args)
    schedule_overlap_pass(gm, options=ScheduleOptions(max_extra_live_bytes=0))
    assert peak_live_bytes(list(gm.graph.nodes)) <= peak_before
    assert torch.equal(gm(*args), ref)


def test_collective_used_without_wait_is_an_error(group_name):
    def f(x):
        y = c10d.all_reduce(x, "sum", group_name)
        return y + 1, c10d.wait_tensor(y)
    gm = make_fx(f)(torch.randn(4))
    with pytest.raises(ValueError, match="without a wait_tensor"):
        schedule_overlap_pass(gm, options=ScheduleOptions())


def test_invalid_options():
    with pytest.raises(ValueError, match="max_in_flight"):
        ScheduleOptions(max_in_flight=0)


# --- forward and backward graphs from torch.compile + AOTAutograd ------------------------------


def test_aot_forward_and_backward_graphs(group_name):
    class G(torch.autograd.Function):  # Megatron g: all-reduce forward, identity backward
        @staticmethod
        def forward(ctx, x):
            return _all_reduce(x, group_name)

        @staticmethod
        def backward(ctx, g):
            return g

    class F(torch.autograd.Function):  # Megatron f: identity forward, all-reduce backward
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return _all_reduce(g, group_name)

    class MLPs(torch.nn.Module):
        def __init__(self, num_layers=2):
            super().__init__()
            self.fc1 = torch.nn.ModuleList(torch.nn.Linear(16, 32) for _ in range(num_layers))
            self.fc2 = torch.nn.ModuleList(torch.nn.Linear(32, 16, bias=False) for _ in range(num_layers))

        def forward(self, x):
            outs = []
            for x_sub in x.chunk(2):  # k = 2 sub-batches
                for fc1, fc2 in zip(self.fc1, self.fc2):
                    x_sub = x_sub + G.apply(fc2(torch.relu(fc1(F.apply(x_sub)))))
                outs.append(x_sub)
            return torch.cat(outs).sum()

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def compiler(tag):
        def compile_fn(gm, example_inputs):
            schedule_overlap_pass(gm, options=ScheduleOptions())
            graphs[tag] = gm
            return make_boxed_func(gm.forward)
        return compile_fn

    torch.manual_seed(0)
    model = MLPs()
    x = torch.randn(8, 16, requires_grad=True)
    loss_ref = model(x)
    loss_ref.backward()
    grads_ref = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=compiler("fw"), bw_compiler=compiler("bw"))
    loss = torch.compile(model, backend=backend, fullgraph=True)(x)
    loss.backward()
    torch._dynamo.reset()

    assert torch.equal(loss, loss_ref)
    for got, want in zip([p.grad for p in model.parameters()] + [x.grad], grads_ref):
        assert torch.equal(got, want)
    for tag in ("fw", "bw"):
        gm = graphs[tag]
        gm.graph.lint()
        order = list(gm.graph.nodes)
        comms = [n for n in order if is_collective(n)]
        assert len(comms) == 4, tag  # 2 layers x 2 sub-batches
        # Every collective but the last has a matmul independent of it between issue and wait.
        for c in comms[:-1]:
            wait = next(iter(c.users))
            between = order[order.index(c) + 1:order.index(wait)]
            assert any("mm" in str(n.target) and not _depends_on(n, c) for n in between), (tag, c.name)


def _depends_on(n: fx.Node, anc: fx.Node) -> bool:
    stack, seen = list(n.all_input_nodes), set()
    while stack:
        a = stack.pop()
        if a is anc:
            return True
        if a not in seen:
            seen.add(a)
            stack.extend(a.all_input_nodes)
    return False


def test_cost_model_reads_symbolic_shapes_by_their_hint():
    # Lives here, not in test_timeline.py: make_fx's first call costs seconds of imports.
    gm = make_fx(lambda a, b: a @ b, tracing_mode="symbolic")(torch.randn(6, 4), torch.randn(4, 5))
    mm = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert not isinstance(mm.meta["val"].shape[0], int)  # really symbolic
    assert timeline.node_flops(mm) == 2 * 6 * 5 * 4
    assert timeline.value_bytes(mm) == 6 * 5 * 4
    assert timeline.AnalyticalCostModel().compute_us(mm) > 0
