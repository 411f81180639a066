"""A pinned plan tests share: a prefill group (TP 2), a decode group of two stages and one of a single stage, on
GPUs of peers pa..pd, with the rendezvous addresses of its worlds' heads."""

from __future__ import annotations

from hypothesis import strategies as st

PINNED = """
[[groups]]
role = "prefill"
stages = [{ gpus = ["a", "b"], layers = [0, 5] }]

[[groups]]
role = "decode"
stages = [{ gpus = ["c"], layers = [0, 3] }, { gpus = ["d:1"], layers = [3, 5] }]

[[groups]]
role = "decode"
stages = [{ gpus = ["d"], layers = [0, 5] }]
"""
GPU_INDEX = {("a", 0): 0, ("b", 0): 1, ("c", 0): 2, ("d", 0): 3, ("d", 1): 4}
GPUS = {"0": ["pa", 0], "1": ["pb", 0], "2": ["pc", 0], "3": ["pd", 0], "4": ["pd", 1]}
RENDEZVOUS = {"pa": ("127.0.0.1", 5000), "pc": ("127.0.0.1", 5002), "pd": ("127.0.0.1", 5001)}

# Any value msgpack and JSON both carry, nested a little: what a peer may put in a body.
json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=20,
)
