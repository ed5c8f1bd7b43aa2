"""Inference on a compiled model: batches the plan's k does not divide, and Hugging Face generate().

Odd batches: a call whose batch k does not split runs with the largest k' <= k that splits it (and,
for regions below the full TMP degree, k' * tp/d pieces), logged once per new shape, since every
new shape is traced and compiled once anyway. k' = 1 is the unsplit program: exact, only without
the overlap of sub-batches.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

log = logging.getLogger("oases_fx")


def batch_size_of(args, kwargs) -> Optional[int]:
    """The common leading dim of the tensor inputs (None if there is none or they disagree)."""
    import torch
    import torch.utils._pytree as pytree

    sizes = {t.shape[0] for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def plan_for_batch(plan, batch_size: Optional[int], splits, say=None):
    """The plan to compile a call of `batch_size` with: `plan` itself when its k (and every region's
    k * n, `splits` = (region, d, n = tp/d) triples) divides the batch, else the same plan with the
    largest k' < k that does. A batch that no k' fits (a region's n does not divide it) is an
    InputError naming the region (check_batch_splits)."""
    from oases_fx.passes.split_sub_batches import check_batch_splits

    k = plan.num_sub_batches
    if batch_size is None or (k == 1 and not splits):
        return plan

    def fits(kk):
        return batch_size % kk == 0 and all(batch_size % (kk * n) == 0 for _, _, n in splits)

    if fits(k):
        return plan
    for kk in range(k - 1, 0, -1):
        if fits(kk):
            msg = (f"a batch of {batch_size} does not split into the plan's num_sub_batches={k}: this shape runs "
                   f"with k={kk} (the largest that divides it; exact, less overlap)")
            log.info("oases_fx: %s", msg)  # every rank; `say` prints it on rank 0
            if say is not None:
                say(msg)
            return dataclasses.replace(plan, num_sub_batches=kk)
    check_batch_splits(batch_size, 1, splits)  # raises, naming the region whose n does not divide the batch
    raise AssertionError("unreachable: k=1 with no region below the full degree always fits")


def convert_compiled(module, fn, apply):
    """OasesModule._apply (under .to(dtype), .half(), .bfloat16(), .float(), .double(), .to(device)):
    `apply` (nn.Module._apply) converts the shards in place (same Parameter objects, so an optimizer
    built before keeps them); a change of dtype then applies `fn` to the user's (meta) model too and
    bumps the module's conversion epoch, so the next call of each input shape traces and compiles
    again at the new dtype (graphs bake dtypes: casts, mask fill values). Moving to another device is
    an error: the mesh, the process groups and the compiled programs belong to the device compiled on."""
    import torch

    from oases_fx.errors import OasesError

    before = {name: (t.dtype, t.device) for name, t in _tensors(module)}
    probe = [(name, t) for name, t in _tensors(module)][:1]
    if probe:
        moved = fn(torch.empty(0, dtype=probe[0][1].dtype, device=probe[0][1].device))
        if moved.device != probe[0][1].device:
            raise OasesError(
                f"the compiled model lives on {probe[0][1].device} (its mesh, process groups and compiled programs "
                f"do); it cannot be moved to {moved.device} after oases_fx.compile. Fix: move the model (or build it "
                "under torch.device('meta')) and the example inputs to the target device before compile.")
    apply(fn)
    after = {name: (t.dtype, t.device) for name, t in _tensors(module)}
    if after != before:
        from oases_fx import released

        with released.retracing():  # its released stand-ins refuse writes from the user, not this one
            module._model._apply(fn)  # the meta model retraces at the new dtype
        module.__dict__["_conversion_epoch"] = module.__dict__.get("_conversion_epoch", 0) + 1
        changed = sorted({f"{str(before[n][0])}->{str(after[n][0])}" for n in before if before[n] != after[n]})
        log.info("oases_fx: parameters converted (%s): the next call of each shape traces and compiles again",
                 ", ".join(changed))
    return module


def _tensors(module):
    return list(module.named_parameters()) + list(module.named_buffers())


# --- Hugging Face generate() ---------------------------------------------------------------------
#
# Without a KV cache, padded to buckets: each decoding step calls the compiled model on the whole
# sequence, right-padded to the next bucket length (powers of two from MIN_BUCKET, capped at the
# model's maximum positions). A causal model's logits at the real positions do not depend on the
# padded tail, so they equal the unpadded call's; generate() reads the last real position's logits.
# The number of programs is bounded by the number of buckets (x the attention-mask variant), not
# the number of tokens. Why no KV cache: a cache changes the graph's inputs every step (its length
# is a shape) and its update is in-place state the sharded graph does not own; recomputing the
# prefix costs O(L) per token more compute, which a bucket bounds, and is exact.

MIN_BUCKET = 16
DELEGATED = ("config", "generation_config", "can_generate", "main_input_name", "name_or_path",
             "prepare_inputs_for_generation", "get_output_embeddings", "get_input_embeddings")
"""Attributes of the user's Hugging Face model that the compiled model answers (read only)."""


def bucket_length(n: int, max_len: Optional[int]) -> int:
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return min(b, max_len) if max_len else b


def _max_positions(config) -> Optional[int]:
    for name in ("n_positions", "max_position_embeddings"):
        v = getattr(config, name, None)
        if isinstance(v, int):
            return v
    return None


def bucketed_forward(module, input_ids, attention_mask=None, position_ids=None):
    """The compiled model on `input_ids` right-padded to its bucket; returns the logits of the real
    positions (B, L, V). An all-ones attention mask is dropped (the same program as no mask)."""
    import torch

    from oases_fx.errors import OasesError

    b, n = input_ids.shape
    max_len = _max_positions(module._model.config)
    if max_len and n > max_len:
        raise OasesError(f"generate: the sequence reached {n} tokens, beyond the model's {max_len} positions. "
                         "Fix: a shorter prompt or max_new_tokens.")
    L = bucket_length(n, max_len)
    pad = L - n
    kw = dict(input_ids=torch.nn.functional.pad(input_ids, (0, pad), value=0))
    if attention_mask is not None and not bool(attention_mask.all()):
        kw["attention_mask"] = torch.nn.functional.pad(attention_mask, (0, pad), value=1)
        if position_ids is not None:  # left padding: positions continue past the last real one
            tail = position_ids[:, -1:] + torch.arange(1, pad + 1, device=position_ids.device)
            kw["position_ids"] = torch.cat([position_ids, tail], 1)
    out = module(**kw)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, :n]


_PROXIES = {}


def _proxy_class(cls):
    """A subclass of the user's HF model class whose forward is the compiled model (bucketed) and
    whose device is the shards' device (the user's model itself holds released meta weights)."""
    if cls not in _PROXIES:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **_ignored):
            from oases_fx.errors import OasesError

            if inputs_embeds is not None or input_ids is None:
                raise OasesError("generate on a compiled model takes input_ids, not inputs_embeds")
            proxy, self.__class__ = self.__class__, cls  # a retrace inside traces the user's own class
            try:
                logits = bucketed_forward(self.__dict__["_oases_module"], input_ids, attention_mask, position_ids)
            finally:
                self.__class__ = proxy
            return CausalLMOutputWithPast(logits=logits)

        def device(self):
            return next(self.__dict__["_oases_module"].parameters()).device

        _PROXIES[cls] = type(f"OasesGenerate{cls.__name__}", (cls,), dict(forward=forward, device=property(device)))
    return _PROXIES[cls]


def generate(module, *args, **kwargs):
    """OasesModule.generate: Hugging Face's own generate() (greedy, sampling, beam search, stopping
    criteria...) with the compiled model as the forward, no KV cache (use_cache=False), the sequence
    padded to buckets. Collective: call it on every TMP rank with the same inputs and seed."""
    import torch

    from oases_fx.errors import OasesError

    hf = module._model
    if not hasattr(hf, "generate") or not hasattr(hf, "config"):
        raise OasesError(f"generate() needs a Hugging Face model with a generate() method; {type(hf).__name__} has none.")
    if getattr(hf.config, "is_encoder_decoder", False):
        raise OasesError(f"generate() on a compiled {type(hf).__name__}: oases_fx decodes causal (decoder-only) models "
                         "only (it right-pads the sequence to a bucket, which is exact only under a causal mask).")
    if kwargs.get("use_cache"):
        raise OasesError("generate(use_cache=True) on a compiled model: oases_fx decodes without a KV cache "
                         "(each step recomputes the prefix, padded to a bucket). Fix: drop use_cache.")
    kwargs["use_cache"] = False
    cls = type(hf)
    hf.__class__ = _proxy_class(cls)
    hf.__dict__["_oases_module"] = module
    try:
        with torch.no_grad():
            return hf.generate(*args, **kwargs)
    finally:
        hf.__class__ = cls
        hf.__dict__.pop("_oases_module", None)
