"""4-bit packing: every value round-trips, two codes per byte."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_train.quant import pack_int4, unpack_int4

torch.set_num_threads(1)


def test_every_pair_of_4bit_values_round_trips():
    values = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(values, values).reshape(-1)  # all 256 (low, high) combinations
    packed = pack_int4(pairs)
    assert packed.dtype == torch.uint8 and packed.numel() == pairs.numel() // 2
    assert torch.equal(unpack_int4(packed), pairs)
    assert packed.unique().numel() == 256  # every byte value is used once: the packing is a bijection


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=-8, max_value=7), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_pack_unpack_round_trip_property(values):
    codes = torch.tensor(values, dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


def test_bad_input():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="integer"):
        pack_int4(torch.zeros(4))
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.zeros(4, dtype=torch.int8))
