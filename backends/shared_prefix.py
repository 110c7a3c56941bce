"""Attention over a prompt prefix that many sequences share, without a copy per sequence.

A transformers key/value cache holds every position once per sequence: a prefix shared by n
sequences is copied n times, concatenated with each sequence's own keys in every layer and,
for grouped-query models, repeated per head group. With short tails (the screen adds two
tokens to a 70-token prefix) that copying, not the matrix products, is where the time went:
three quarters of it on SmolLM2 on a CPU.

Here the prefix's keys and values stay one row per layer, each sequence's own positions are
kept per row, and the scores against the prefix are one matrix product for all rows (their
queries stacked). The attention function is registered with transformers' attention
interface under ``NAME``; outside ``SharedPrefix.active()`` it is plain ``sdpa``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

NAME = "harness_shared_prefix"
_STATE: contextvars.ContextVar[SharedPrefix | None] = contextvars.ContextVar(
    "harness_shared_prefix", default=None)


class SharedPrefix:
    """One prefix's keys and values (per layer, one row) and the rows' own positions."""

    def __init__(self, cache: Any, length: int) -> None:
        self.prefix = [(layer.keys, layer.values) for layer in cache.layers]
        self.length = length
        self.tail: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @contextmanager
    def active(self) -> Iterator[None]:
        token = _STATE.set(self)
        try:
            yield
        finally:
            _STATE.reset(token)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (decided sequences leave the batch)."""
        self.tail = {i: (k[rows], v[rows]) for i, (k, v) in self.tail.items()}

    def positions(self, rows: int, new: int, device: Any) -> torch.Tensor:
        """Position ids of the next ``new`` tokens of each row."""
        seen = self.length + (next(iter(self.tail.values()))[0].shape[2] if self.tail else 0)
        return torch.arange(seen, seen + new, device=device).expand(rows, new)


def _attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    state = _STATE.get()
    if state is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    layer = module.layer_idx
    window = kwargs.get("sliding_window")
    if window and state.length + key.shape[2] + (
            state.tail[layer][0].shape[2] if layer in state.tail else 0) > window:
        raise RuntimeError(f"prompt longer than the sliding window ({window} positions)")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise RuntimeError("attention sinks are not supported by the shared-prefix path")
    if layer in state.tail:
        old_k, old_v = state.tail[layer]
        key, value = torch.cat([old_k, key], dim=2), torch.cat([old_v, value], dim=2)
    state.tail[layer] = (key, value)
    pk, pv = state.prefix[layer]  # (1, kv_heads, P, d)
    n, heads, q_len, dim = query.shape
    kv_heads, own = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    # (kv_heads, n * group * q_len, d): every row's queries against the one prefix copy
    q = query.reshape(n, kv_heads, group, q_len, dim)
    stacked = q.permute(1, 0, 2, 3, 4).reshape(kv_heads, n * group * q_len, dim)
    s_prefix = (stacked @ pk[0].transpose(1, 2)).reshape(kv_heads, n, group, q_len, -1)
    s_prefix = s_prefix.permute(1, 0, 2, 3, 4)
    s_own = q @ key[:, :, None].transpose(-1, -2)  # (n, kv_heads, group, q_len, own)
    scores = torch.cat([s_prefix, s_own], dim=-1).float() * scale
    softcap = kwargs.get("softcap")
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    # a row's own positions are causal: query i (of the last q_len) sees own[: own - q_len + i + 1]
    causal = (torch.arange(own, device=query.device)[None, :]
              <= torch.arange(own - q_len, own, device=query.device)[:, None])
    scores[..., state.length:] = scores[..., state.length:].masked_fill(~causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    p_prefix = probs[..., : state.length].permute(1, 0, 2, 3, 4).reshape(
        kv_heads, n * group * q_len, -1)
    out = (p_prefix @ pv[0]).reshape(kv_heads, n, group, q_len, dim).permute(1, 0, 2, 3, 4)
    out = out + probs[..., state.length:] @ value[:, :, None]
    return out.reshape(n, heads, q_len, dim).transpose(1, 2).contiguous(), None


def _mask(*args: Any, **kwargs: Any) -> Any:
    if _STATE.get() is not None:
        return None  # the attention above builds its own
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


def install(model: Any) -> bool:
    """Route ``model``'s attention through ``_attention``; False where the model cannot
    (no layer index on its attention modules, attention sinks, a sliding window shorter than
    the prompts)."""
    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, NotImplementedError, AttributeError):
        return False
    return True
