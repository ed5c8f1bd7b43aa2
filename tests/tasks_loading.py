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
    local_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in m.state_dict(keep_vars=True).values()}.values())
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
