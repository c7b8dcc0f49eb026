"""lowering/sharding.py, the parts that need no mesh: which devices hold the same piece of a
tensor (what tells the FSDP pattern from tensor parallelism), and layouts outside SPMD."""
from __future__ import annotations

import torch
from loop_testing import xla_device

from xla_loop_backend.lowering.sharding import _shard_groups, gathered_invariants, stacks_like_carries


def test_shard_groups_tell_which_devices_hold_one_piece():
    singletons = frozenset(frozenset({d}) for d in range(4))
    assert _shard_groups("{devices=[4,1]0,1,2,3}") == singletons
    assert _shard_groups("{devices=[1,4,1]0,1,2,3}") == singletons  # (a stack: the steps whole)
    # a 2x2 mesh: split over its first axis, or over its second
    over_data = _shard_groups("{devices=[2,1,2]0,1,2,3 last_tile_dim_replicate}")
    over_model = _shard_groups("{devices=[1,2,2]0,2,1,3 last_tile_dim_replicate}")
    assert over_data == frozenset({frozenset({0, 1}), frozenset({2, 3})})
    assert over_model == frozenset({frozenset({0, 2}), frozenset({1, 3})})
    assert _shard_groups("{devices=[2,2]0,1,2,3}") == frozenset(frozenset({d}) for d in range(4))
    assert _shard_groups("{replicated}") is None and _shard_groups("") is None


def test_outside_spmd_the_state_is_left_as_it_is():
    state = [torch.zeros(3, device=xla_device()), torch.ones(4, 4, device=xla_device())]
    assert all(a is b for a, b in zip(gathered_invariants(state, [1]), state))
    assert all(a is b for a, b in zip(stacks_like_carries(state, state[:1]), state))
