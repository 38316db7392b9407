"""ParallelDims: -1 resolution, product checks with messages naming the keys, world size 1 without a mesh."""

from __future__ import annotations

import pytest

from posttrain.config.sections import ParallelismSection
from posttrain.parallelisms.parallel_dims import ParallelDims


@pytest.mark.parametrize(
    "degrees, world, expected",
    [
        ((1, -1, 1), 8, (1, 8, 1)),
        ((1, -1, 2), 8, (1, 4, 2)),
        ((2, -1, 2), 8, (2, 2, 2)),
        ((-1, 2, 1), 8, (4, 2, 1)),
        ((1, 2, -1), 8, (1, 2, 4)),
        ((1, -1, 1), 1, (1, 1, 1)),
        ((2, 2, 2), 8, (2, 2, 2)),
    ],
)
def test_minus_one_takes_the_rest_of_the_world(degrees, world, expected):
    dims = ParallelDims(*degrees, world_size=world)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp) == expected


def test_product_mismatch_names_every_key_and_the_world_size():
    with pytest.raises(ValueError) as err:
        ParallelDims(dp_replicate=2, dp_shard=3, tp=1, world_size=4)
    msg = str(err.value)
    for part in ("parallelism.dp_replicate (2)", "parallelism.dp_shard (3)", "parallelism.tp (1)", "= 6", "world size is 4"):
        assert part in msg


def test_minus_one_that_cannot_divide_names_the_other_keys():
    with pytest.raises(ValueError, match=r"parallelism.dp_shard=-1.*parallelism.dp_replicate, parallelism.tp"):
        ParallelDims(dp_replicate=1, dp_shard=-1, tp=3, world_size=8)


def test_two_minus_ones_are_refused():
    with pytest.raises(ValueError, match="only one of"):
        ParallelDims(dp_replicate=-1, dp_shard=-1, tp=1, world_size=4)


@pytest.mark.parametrize("bad", [0, -2])
def test_zero_or_negative_degrees_are_refused(bad):
    with pytest.raises(ValueError, match=f"parallelism.tp={bad}"):
        ParallelDims(dp_replicate=1, dp_shard=-1, tp=bad, world_size=4)


def test_enabled_flags_and_dp_degree():
    dims = ParallelDims(2, -1, 2, world_size=16)
    assert dims.dp_shard == 4 and dims.dp_degree == 8
    assert dims.fsdp_enabled and dims.hsdp_enabled and dims.tp_enabled
    tp_only = ParallelDims(1, 1, -1, world_size=4)
    assert not tp_only.fsdp_enabled and tp_only.tp_enabled and tp_only.dp_degree == 1
    replicate_only = ParallelDims(-1, 1, 1, world_size=2)
    assert replicate_only.fsdp_enabled and replicate_only.hsdp_enabled and not replicate_only.dp_shard_enabled


def test_world_size_one_needs_no_process_group():
    dims = ParallelDims.from_config(ParallelismSection(), world_size=1)
    assert dims.build_mesh("cpu") is None
    assert dims.dp_rank == 0 and dims.dp_degree == 1 and dims.tp_rank == 0
    assert dims.fsdp_mesh is None and dims.tp_mesh is None and dims.dp_mesh is None


def test_sub_meshes_before_build_mesh_say_what_to_call():
    dims = ParallelDims(1, -1, 1, world_size=2)
    with pytest.raises(RuntimeError, match="build_mesh"):
        _ = dims.fsdp_mesh
