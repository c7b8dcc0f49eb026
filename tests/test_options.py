"""options.py: the options parse, refuse bad values with the option's name, and map to
what the passes and the lowering read."""
from __future__ import annotations

import pytest

from xla_loop_backend.options import DEFAULT_INVARIANT_BUDGET, InvariantGathering, Options


@pytest.mark.parametrize(
    "value, gathering",
    [
        (None, InvariantGathering(DEFAULT_INVARIANT_BUDGET, fsdp_only=True)),
        (True, InvariantGathering(DEFAULT_INVARIANT_BUDGET, fsdp_only=False)),
        (False, InvariantGathering(0, fsdp_only=True)),
        (2**20, InvariantGathering(2**20, fsdp_only=True)),
    ],
)
def test_gather_invariants_maps_to_a_budget_and_a_rule(value, gathering):
    assert Options.parse({"gather_invariants": value}).invariant_gathering() == gathering


@pytest.mark.parametrize("value", [-1, "yes", 1.5])
def test_a_bad_gather_invariants_is_refused_by_name(value):
    with pytest.raises(ValueError, match="gather_invariants"):
        Options.parse({"gather_invariants": value})


def test_unknown_options_are_refused_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown options.*gather_invariants"):
        Options.parse({"gather_everything": True})
