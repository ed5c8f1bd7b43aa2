"""Rank tasks for meta-device init, shard-on-read loading, odd batches, .to() and generate().

Each task builds the model under torch.device("meta") (or in full for the reference), compiles it,
loads weights and returns numbers for the parent to compare against the unsharded reference.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import oases_fx
from tests.tasks import build_model


def save_hf_model(kind: str, cfg: dict, folder: str, *, max_shard_size=None, tie=None) -> dict:
    """Parent-side: build the reference model and save_pretrained it; returns its weight bytes."""
    model = build_model(kind, cfg)
    if tie is not None:  # HF ties lm_head to the input embedding in tie_weights() when the config says so
        model.config.tie_word_embeddings = tie
        model.tie_weights()
        assert (model.lm_head.weight is model.get_input_embeddings().weight) == tie
    kw = dict(max_shard_size=max_shard_size) if max_shard_size else {}
    model.save_pretrained(folder, **kw)
    uniq = {id(p): p for p in model.parameters()}
    return dict(weight_bytes=sum(p.numel() * p.element_size() for p in uniq.values()))


def _peak_rss_reset() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: /proc/self/clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _hf_from_folder(kind, folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")


def _meta_model(kind, folder):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def meta_load_matches(rank, world_size, *, kind, folder, batch, seq, vocab, how="hf", num_sub_batches=1,
                      forget=False, report_all=False):
    """Meta-device build + load (how="hf": load_pretrained(folder); "full": load_full_state_dict of the
    reference's state dict) vs from_pretrained(folder) unsharded: loss, logits, every gradient.
    Also the bytes this rank materialised and its peak RSS increase while loading."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, vocab, (batch, seq), generator=g)
    meta = _meta_model(kind, folder)
    assert all(p.is_meta for p in meta.parameters())
    m = oases_fx.compile(meta, mesh, example_kwargs=dict(input_ids=idx, labels=idx), plan="megatron",
                         num_sub_batches=num_sub_batches, backend="aot_eager", verbose=False)
    out = {}
    if forget:
        try:
            m(input_ids=idx, labels=idx)
        except Exception as e:  # the error the user sees when weights were never loaded
            out["forget_error"] = (type(e).__name__, str(e))
        if rank != 0:
            return None
        return out
    local_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in m._boundary.local_state_dict().values()}.values())  # this rank's shards
    reset = _peak_rss_reset()
    rss0 = _status_kib("VmRSS")
    if how == "hf":
        rep = oases_fx.load_pretrained(m, folder)
        out.update(bytes_read=rep.bytes_read, checkpoint_bytes=rep.checkpoint_bytes, aliases=rep.aliases,
                   largest_read=rep.largest_read)
    hwm = _status_kib("VmHWM")
    out.update(local_bytes=local_bytes, rss_reset=reset, peak_rss_increase=(hwm - rss0) * 1024,
               rss_file_kib=_status_kib("RssFile"), rss_anon_kib=_status_kib("RssAnon"))
    ref = _hf_from_folder(kind, folder)
    if how == "full":
        m.load_full_state_dict(ref.state_dict())
    o = m(input_ids=idx, labels=idx)
    o.loss.backward()
    r = ref(input_ids=idx, labels=idx)
    r.loss.backward()
    grads = m.full_grads()
    if rank != 0:
        return out if report_all else None
    out.update(loss=o.loss.detach(), ref_loss=r.loss.detach(), logits=o.logits.detach(), ref_logits=r.logits.detach(),
               grads=grads, ref_grads={k: p.grad for k, p in ref.named_parameters()},
               buffers={k: b for k, b in m.named_buffers()}, ref_buffers={k: b for k, b in ref.named_buffers()})
    return out


def odd_batches(rank, world_size, *, kind, k, batches, cfg, eval_batches=()):
    """Compile at a batch k divides, then train on `batches` (a last batch of 3 with k=2, ...) and
    evaluate `eval_batches` (a single prompt): loss, logits and gradients vs the unsharded model."""
    from tests.tasks import _call

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    ref = build_model(kind, cfg)
    model = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(3)
    V = cfg["vocab_size"]

    def batch(b):
        return torch.randint(0, V, (b, 8), generator=g), torch.randint(0, V, (b, 8), generator=g)

    idx, tgt = batch(4)
    if kind == "gpt":
        m = oases_fx.compile(model, mesh, example_inputs=(idx, tgt), num_sub_batches=k, backend="aot_eager",
                             verbose=False, plan="megatron")
    else:
        m = oases_fx.compile(model, mesh, example_kwargs=dict(input_ids=idx, labels=tgt), num_sub_batches=k,
                             backend="aot_eager", verbose=False, plan="megatron")
    out = []
    for b in batches:
        idx, tgt = batch(b)
        for p in list(m.parameters()) + list(ref.parameters()):
            p.grad = None
        logits, loss = _call(kind, m, idx, tgt)
        loss.backward()
        r_logits, r_loss = _call(kind, ref, idx, tgt)
        r_loss.backward()
        out.append(dict(batch=b, loss=loss.detach(), ref_loss=r_loss.detach(), logits=logits.detach(),
                        ref_logits=r_logits.detach(), grads=m.full_grads(),
                        ref_grads={n: p.grad for n, p in ref.named_parameters()},
                        notes=list(m.graphs.gm.meta["oases"].get("sub_batch_notes", []))))
    m.eval()
    ref.eval()
    for b in eval_batches:
        idx, tgt = batch(b)
        with torch.no_grad():
            logits, loss = _call(kind, m, idx, tgt)
            r_logits, r_loss = _call(kind, ref, idx, tgt)
        out.append(dict(batch=b, loss=loss, ref_loss=r_loss, logits=logits, ref_logits=r_logits, grads=None))
    if rank != 0:
        return None
    return dict(results=out, programs=len(m._programs))


def odd_batch_degree(rank, world_size, *, cfg):
    """Attention at TMP degree 1 on tp=2 (n=2 batch chunks), k=2, compiled at batch 4: a batch of 2
    runs with k=1 (1*2 pieces), a batch of 3 fits no k and must name the region."""
    from tests.tasks_degree import degree_plan

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    ref = build_model("gpt", cfg)
    model = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, cfg["vocab_size"], (4, 8), generator=g)
    m = oases_fx.compile(model, mesh, example_inputs=(idx, idx), backend="aot_eager", verbose=False,
                         plan=degree_plan("gpt", cfg["n_layer"], world_size, [(1, world_size)], k=2))
    two = idx[:2].contiguous()
    logits, loss = m(two, two)
    r_logits, r_loss = ref(two, two)
    err = None
    try:
        three = idx[:3].contiguous()
        m(three, three)
    except Exception as e:
        err = (type(e).__name__, str(e))
    if rank != 0:
        return None
    return dict(loss=loss.detach(), ref_loss=r_loss.detach(), logits=logits.detach(), ref_logits=r_logits.detach(),
                grads=None, error=err)


def convert_after_compile(rank, world_size, *, kind, cfg, how):
    """Compile in fp32, call once, then convert the compiled model (how: "double", "bfloat16", "half",
    "to_float64"): logits and loss vs the unsharded model converted the same way; the Parameter
    objects (an optimizer's) are kept. Also .to("meta") must be an OasesError."""
    from tests.tasks import _call

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    ref = build_model(kind, cfg)
    model = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(11)
    idx = torch.randint(0, cfg["vocab_size"], (2, 8), generator=g)
    kw = dict(example_inputs=(idx, idx)) if kind == "gpt" else dict(example_kwargs=dict(input_ids=idx, labels=idx))
    m = oases_fx.compile(model, mesh, backend="aot_eager", verbose=False, plan="megatron", **kw)
    _call(kind, m, idx, idx)
    params = list(m.parameters())
    conv = {"double": lambda x: x.double(), "bfloat16": lambda x: x.bfloat16(), "half": lambda x: x.half(),
            "to_float64": lambda x: x.to(torch.float64)}[how]
    assert conv(m) is m
    conv(ref)
    logits, loss = _call(kind, m, idx, idx)
    loss.backward()
    r_logits, r_loss = _call(kind, ref, idx, idx)
    r_loss.backward()
    grads = m.full_grads()
    err = None
    try:
        m.to("meta")
    except Exception as e:
        err = (type(e).__name__, str(e))
    if rank != 0:
        return None
    return dict(loss=loss.detach(), ref_loss=r_loss.detach(), logits=logits.detach(), ref_logits=r_logits.detach(),
                grads=grads, ref_grads={n: p.grad for n, p in ref.named_parameters()}, error=err,
                same_params=all(p is q for p, q in zip(params, m.parameters())),
                dtypes=sorted({str(p.dtype) for p in m.parameters()}), programs=len(m._programs))


def generate_matches(rank, world_size, *, kind, cfg, prompt_len, new_tokens, batch=1, k=2, meta_folder=None):
    """HF generate() on the compiled model (greedy, then sampling with a fixed seed) vs the unsharded
    model's generate(): the tokens, and how many programs decoding compiled."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    ref = build_model(kind, cfg)
    model = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(21)
    V = cfg["vocab_size"]
    idx = torch.randint(1, V, (2, 8), generator=g)
    m = oases_fx.compile(model, mesh, example_kwargs=dict(input_ids=idx, labels=idx), num_sub_batches=k,
                         backend="aot_eager", verbose=False, plan="megatron")
    m(input_ids=idx, labels=idx).loss.backward()  # one training step's forward/backward first
    m.eval()
    ref.eval()
    before = len(m._programs)
    prompt = torch.randint(1, V, (batch, prompt_len), generator=g)
    out = {}
    for mode, extra in (("greedy", dict(do_sample=False)), ("sample", dict(do_sample=True, top_k=0))):
        res = []
        for which in (m, ref):
            torch.manual_seed(1000)
            res.append(which.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=0, **extra))
        out[mode] = res
    out["new_programs"] = len(m._programs) - before
    out["config_delegated"] = m.config is model.config and m.generation_config is model.generation_config
    if rank != 0:
        return None
    return out


def meta_load_auto_vocab(rank, world_size, *, kind, folder, vocab):
    """plan="auto" (analytical) with the vocab-parallel embedding/LM head forced, on a meta model loaded
    from the folder: the vocab-sharded tensors are read by slice too. Loss/logits/grads vs from_pretrained."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    g = torch.Generator().manual_seed(8)
    idx = torch.randint(0, vocab, (4, 8), generator=g)
    m = oases_fx.compile(_meta_model(kind, folder), mesh, example_kwargs=dict(input_ids=idx, labels=idx), plan="auto",
                         profile="analytical", planner_vocab_parallel=(True,), backend="aot_eager", verbose=False)
    rep = oases_fx.load_pretrained(m, folder)
    ref = _hf_from_folder(kind, folder)
    o = m(input_ids=idx, labels=idx)
    o.loss.backward()
    r = ref(input_ids=idx, labels=idx)
    r.loss.backward()
    grads = m.full_grads()
    if rank != 0:
        return None
    return dict(loss=o.loss.detach(), ref_loss=r.loss.detach(), logits=o.logits.detach(), ref_logits=r.logits.detach(),
                grads=grads, ref_grads={k: p.grad for k, p in ref.named_parameters()}, buffers={}, ref_buffers={},
                vocab_parallel=m.plan.vocab_parallel, bytes_read=rep.bytes_read, checkpoint_bytes=rep.checkpoint_bytes)


def meta_plain_gpt_full_state_dict(rank, world_size, *, cfg, batch, seq, k=2, compile_kwargs=None):
    """The plain GPT (oases_fx.models) built under torch.device("meta"), compiled (with
    `compile_kwargs`, e.g. compile_layers="reuse"), filled with load_full_state_dict from an
    identically seeded full model: loss, logits, grads vs that model, and explain()."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    ref = build_model("gpt", cfg)
    with torch.device("meta"):
        meta = build_model("gpt", cfg)
    g = torch.Generator().manual_seed(9)
    idx = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=g)
    tgt = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=g)
    m = oases_fx.compile(meta, mesh, example_inputs=(idx, tgt), num_sub_batches=k, plan="megatron",
                         backend="aot_eager", verbose=False, **(compile_kwargs or {}))
    # torchtitan's order (to_empty + init_weights after parallelising) is refused, naming the fix
    refused = []
    for call in (lambda: m.to_empty(device="cpu"), lambda: m.init_weights(), lambda: m.reset_parameters()):
        try:
            call()
        except oases_fx.OasesError as e:
            refused.append(str(e))
    m.load_full_state_dict(ref.state_dict())
    logits, loss = m(idx, tgt)
    loss.backward()
    r_logits, r_loss = ref(idx, tgt)
    r_loss.backward()
    grads = m.full_grads()
    if rank != 0:
        return None
    return dict(loss=loss.detach(), ref_loss=r_loss.detach(), logits=logits.detach(), ref_logits=r_logits.detach(),
                grads=grads, ref_grads={k: p.grad for k, p in ref.named_parameters()}, buffers={}, ref_buffers={},
                explain=m.explain(), refused=refused)


def meta_dcp_load(rank, world_size, *, cfg, batch, seq, path):
    """The unsharded model's state dict saved with DCP (every rank the same, plain tensors), then loaded
    with get_model_state_dict / dcp.load / set_model_state_dict into a model compiled from the meta
    device: loss, logits, grads vs the unsharded model (and no WeightsNotLoadedError)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    ref = build_model("gpt", cfg)
    dcp.save({"model": get_model_state_dict(ref)}, checkpoint_id=path)
    with torch.device("meta"):
        meta = build_model("gpt", cfg)
    g = torch.Generator().manual_seed(10)
    idx = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=g)
    m = oases_fx.compile(meta, mesh, example_inputs=(idx, idx), plan="megatron", backend="aot_eager", verbose=False)
    state = {"model": get_model_state_dict(m)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(m, state["model"])
    logits, loss = m(idx, idx)
    loss.backward()
    r_logits, r_loss = ref(idx, idx)
    r_loss.backward()
    grads = m.full_grads()
    if rank != 0:
        return None
    return dict(loss=loss.detach(), ref_loss=r_loss.detach(), logits=logits.detach(), ref_logits=r_logits.detach(),
                grads=grads, ref_grads={k: p.grad for k, p in ref.named_parameters()}, buffers={}, ref_buffers={})
