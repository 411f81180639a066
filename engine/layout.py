"""How one replica is sharded: pipeline stages over layers, tensor parallelism over heads, and rank numbering."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageLayout:
    """One pipeline stage: the global layers ``[start_layer, end_layer)`` split over ``tp`` tensor-parallel ranks."""

    start_layer: int
    end_layer: int
    tp: int

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.start_layer


GroupLayout = tuple[StageLayout, ...]
"""A replica's stages in pipeline order; ranks are numbered stage-major (see :func:`rank_position`)."""


def check_kv_heads_shardable(num_kv_heads: int, tp: int) -> None:
    """Raise ValueError unless ``num_kv_heads`` KV heads can be spread over ``tp`` ranks.

    Sharding works when ``tp`` divides the head count (each rank holds a contiguous run) or the head count
    divides ``tp`` (each head is replicated on ``tp // num_kv_heads`` ranks). O(1).
    """
    if num_kv_heads < 1:
        raise ValueError(f"num_kv_heads must be >= 1, got {num_kv_heads}")
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    if num_kv_heads % tp != 0 and tp % num_kv_heads != 0:
        raise ValueError(f"{num_kv_heads} KV heads cannot be sharded over tp={tp}: one of them must divide the other")


def check_stages(layout: GroupLayout, num_layers: int) -> None:
    """Raise ValueError unless ``layout``'s stages are non-empty, contiguous and cover ``[0, num_layers)``.

    Also checks each ``tp >= 1``. O(number of stages).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not layout:
        raise ValueError("a layout needs at least one stage")
    expected_start = 0
    for index, stage in enumerate(layout):
        if not isinstance(stage, StageLayout):
            raise ValueError(f"stage {index} is a {type(stage).__name__}, not a StageLayout")
        if stage.start_layer != expected_start:
            raise ValueError(
                f"stage {index} starts at layer {stage.start_layer} but the previous stage ended at {expected_start}"
            )
        if stage.end_layer <= stage.start_layer:
            raise ValueError(f"stage {index} has no layers: [{stage.start_layer}, {stage.end_layer})")
        if stage.tp < 1:
            raise ValueError(f"stage {index} has tp={stage.tp}; tp must be >= 1")
        expected_start = stage.end_layer
    if expected_start != num_layers:
        raise ValueError(f"the stages end at layer {expected_start} but the model has {num_layers} layers")


def validate_layout(layout: GroupLayout, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
    """Raise ValueError with the reason unless ``layout`` can run a model of this shape.

    Checks: stages contiguous from layer 0 to ``num_layers``, each non-empty with ``tp >= 1``, ``num_heads``
    divisible by every ``tp``, and ``num_kv_heads`` shardable over every ``tp`` (see
    :func:`check_kv_heads_shardable`). O(number of stages).
    """
    check_stages(layout, num_layers)
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    for index, stage in enumerate(layout):
        if num_heads % stage.tp != 0:
            raise ValueError(f"stage {index}: {num_heads} attention heads are not divisible by tp={stage.tp}")
        try:
            check_kv_heads_shardable(num_kv_heads, stage.tp)
        except ValueError as error:
            raise ValueError(f"stage {index}: {error}") from None


def uniform_layout(num_layers: int, pp: int, tp: int) -> GroupLayout:
    """Split ``num_layers`` layers into ``pp`` stages of ``tp`` ranks each, as evenly as possible.

    The first ``num_layers % pp`` stages take one extra layer. Raises ValueError when ``pp`` exceeds
    ``num_layers`` or a count is below 1. O(pp).
    """
    if num_layers < 1 or pp < 1 or tp < 1:
        raise ValueError(f"num_layers, pp and tp must all be >= 1, got {num_layers}, {pp}, {tp}")
    if pp > num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {pp} non-empty stages")
    base, extra = divmod(num_layers, pp)
    stages = []
    start = 0
    for index in range(pp):
        end = start + base + (1 if index < extra else 0)
        stages.append(StageLayout(start, end, tp))
        start = end
    return tuple(stages)


def world_size(layout: GroupLayout) -> int:
    """Total ranks in the replica: the sum of the stages' tp. O(number of stages)."""
    return sum(stage.tp for stage in layout)


def stage_ranks(layout: GroupLayout, stage: int) -> list[int]:
    """The layout ranks of stage ``stage``, in tp order. O(number of stages + tp)."""
    if not 0 <= stage < len(layout):
        raise ValueError(f"stage {stage} is out of range for a layout of {len(layout)} stages")
    first = sum(s.tp for s in layout[:stage])
    return list(range(first, first + layout[stage].tp))


def rank_position(layout: GroupLayout, rank: int) -> tuple[int, int]:
    """``(stage index, tp rank)`` of layout rank ``rank``.

    Ranks are numbered stage-major: stage 0's tp ranks are ``0 .. tp0 - 1``, then stage 1's, and so on.
    Raises ValueError for a rank outside ``[0, world_size(layout))``. O(number of stages).
    """
    if rank >= 0:
        first = 0
        for index, stage in enumerate(layout):
            if rank < first + stage.tp:
                return index, rank - first
            first += stage.tp
    raise ValueError(f"rank {rank} is out of range for a layout of {world_size(layout)} ranks")


def kv_head_range(num_kv_heads: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """The global KV heads ``[start, end)`` that tensor-parallel rank ``tp_rank`` of ``tp`` holds.

    With ``tp <= num_kv_heads`` (``tp`` must divide the head count) each rank holds a contiguous run of
    ``num_kv_heads // tp`` heads. With ``tp > num_kv_heads`` (the head count must divide ``tp``) each head is
    replicated on ``tp // num_kv_heads`` consecutive ranks and rank ``r`` holds head ``r // (tp // num_kv_heads)``.
    Anything else raises ValueError. O(1).
    """
    check_kv_heads_shardable(num_kv_heads, tp)
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tp_rank {tp_rank} is out of range for tp={tp}")
    if tp <= num_kv_heads:
        per_rank = num_kv_heads // tp
        return tp_rank * per_rank, (tp_rank + 1) * per_rank
    head = tp_rank // (tp // num_kv_heads)
    return head, head + 1


def head_range(num_heads: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """The global query heads ``[start, end)`` of tensor-parallel rank ``tp_rank``; ``tp`` must divide ``num_heads``.

    Raises ValueError otherwise. O(1).
    """
    if num_heads < 1 or tp < 1:
        raise ValueError(f"num_heads and tp must be >= 1, got {num_heads} and {tp}")
    if num_heads % tp != 0:
        raise ValueError(f"{num_heads} attention heads are not divisible by tp={tp}")
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tp_rank {tp_rank} is out of range for tp={tp}")
    per_rank = num_heads // tp
    return tp_rank * per_rank, (tp_rank + 1) * per_rank
