"""Varlen prefill for the SDPA path: a step's prompts (or prompt chunks) padded into batches, one SDPA call each.

Sequence ``b`` brings ``query_lens[b]`` new tokens at the end of its ``context_lens[b]`` tokens. Sequences
are grouped by the power of two above their query and context lengths, so padding at most doubles each
dimension of a group: a step of similar prompts is one group and one call, and the calls of a step are
bounded by the length classes (about log2 of the longest prompt, squared), never by the sequences. In a
group, queries are scattered into a [B, q_width] layout (q_width the group's longest query); keys come
from the step itself (no cached prefix: the same layout, so a plain causal mask also hides the padding
from every real query) or from the paged cache (whole blocks gathered, k_width the longest context), with
a boolean mask saying which keys each query sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hexgen.engine.step_inputs import to_device


@dataclass(frozen=True)
class PrefillPlan:
    """Where each token of a varlen prefill goes in the padded layout, built once per step on the host.

    ``source`` [N]: the group's tokens among the step's prefill tokens (None: all of them, in order);
    ``index`` [N]: the row of each in [B * q_width]; ``starts``, ``query_lens``, ``context_lens``
    [B, 1, 1, 1]; ``gather`` the block ids [B * blocks] of each sequence's cached keys (None without a
    cached prefix: then SDPA's own causal mask is exact for every real query).
    """

    source: torch.Tensor | None
    index: torch.Tensor
    q_width: int
    k_width: int
    starts: torch.Tensor
    query_lens: torch.Tensor
    context_lens: torch.Tensor
    gather: torch.Tensor | None
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # by window, built on first use

    @property
    def batch(self) -> int:
        return int(self.starts.shape[0])


def plan_prefill(
    query_lens: list[int], context_lens: list[int], block_tables: torch.Tensor | None, device: torch.device
) -> list[PrefillPlan]:
    """The groups of one varlen prefill; ``block_tables`` [B, blocks] on ``device`` when any sequence has
    a cached prefix (its keys are then read from the cache), else None. O(N + B)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for b, (q, ctx) in enumerate(zip(query_lens, context_lens, strict=True)):
        groups.setdefault(((q - 1).bit_length(), (ctx - 1).bit_length()), []).append(b)
    starts = torch.tensor([0, *query_lens]).cumsum(0)
    plans = []
    for rows in groups.values():
        source = None
        if len(rows) < len(query_lens):
            source = torch.cat([torch.arange(int(starts[b]), int(starts[b + 1])) for b in rows])
        tables = None if block_tables is None else block_tables[to_device(torch.tensor(rows), device)]
        group_q, group_ctx = [query_lens[b] for b in rows], [context_lens[b] for b in rows]
        plans.append(_plan_group(group_q, group_ctx, tables, source, device))
    return plans


def _plan_group(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: torch.Tensor | None,
    source: torch.Tensor | None,
    device: torch.device,
) -> PrefillPlan:
    q = torch.tensor(query_lens)
    ctx = torch.tensor(context_lens)
    batch, q_width = len(query_lens), max(query_lens)
    cu = torch.cumsum(q, 0) - q
    index = torch.arange(int(q.sum())) + torch.repeat_interleave(torch.arange(batch) * q_width - cu, q)
    shape = (batch, 1, 1, 1)
    gather = None if block_tables is None else block_tables.long().view(-1)
    return PrefillPlan(
        source=None if source is None else to_device(source, device),
        index=to_device(index, device),
        q_width=q_width,
        k_width=max(context_lens) if gather is not None else q_width,
        starts=to_device((ctx - q).view(shape), device),
        query_lens=to_device(q.view(shape), device),
        context_lens=to_device(ctx.view(shape), device),
        gather=gather,
    )


def prefill_mask(plan: PrefillPlan, window: int) -> torch.Tensor:
    """[B, 1, q_width, k_width] bool: query ``i`` of sequence ``b`` (position starts[b] + i) sees key ``j``
    (position j) causally, within ``window`` when > 0.
    Padding rows see every key so that no softmax row is empty. Built once per step and window."""
    if window not in plan.masks:
        device = plan.index.device
        rows = torch.arange(plan.q_width, device=device).view(1, 1, -1, 1)
        key_pos = torch.arange(plan.k_width, device=device).view(1, 1, 1, -1)
        query_pos = rows + plan.starts  # starts are 0 when keys come from the step (no cached prefix)
        allowed = key_pos <= query_pos
        if window:
            allowed &= query_pos - key_pos < window
        plan.masks[window] = allowed | (rows >= plan.query_lens)
    return plan.masks[window]


def pad(x: torch.Tensor, plan: PrefillPlan) -> torch.Tensor:
    """Tokens [N, heads, dim] into [B, heads, q_width, dim], zeros where a sequence is shorter. O(B * q_width)."""
    out = x.new_zeros(plan.batch * plan.q_width, *x.shape[1:])
    out.index_copy_(0, plan.index, x)
    return out.view(plan.batch, plan.q_width, *x.shape[1:]).transpose(1, 2)


def unpad(out: torch.Tensor, plan: PrefillPlan) -> torch.Tensor:
    """[B, heads, q_width, dim] back to the step's tokens [N, heads, dim]. O(N)."""
    flat = out.transpose(1, 2).reshape(plan.batch * plan.q_width, *out.shape[1:2], out.shape[3])
    return flat.index_select(0, plan.index)
