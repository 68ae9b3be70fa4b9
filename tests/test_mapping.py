"""pipeline.parallel.mapping: rank layout (TP fastest), groups, layer ranges, validation."""

from __future__ import annotations

import pytest

from pipeline.errors import PipelineError
from pipeline.parallel.mapping import Mapping, check_layout


def test_rank_layout_tp_fastest():
    # TensorRT-LLM / FasterTransformer: rank = pp_rank * tp + tp_rank.
    got = [(m.tp_rank, m.pp_rank) for m in Mapping(2, 2).all_ranks()]
    assert got == [(0, 0), (1, 0), (0, 1), (1, 1)]
    m = Mapping(tp=4, pp=2, rank=6)
    assert (m.tp_rank, m.pp_rank) == (2, 1)
    assert m.rank_of(2, 1) == 6
    assert m.tp_group == [4, 5, 6, 7]
    assert m.prev_rank == 2
    assert m.is_last_stage and not m.is_first_stage


def test_pp_neighbours_and_stage_flags():
    first, last = Mapping(2, 3, rank=1), Mapping(2, 3, rank=5)
    assert first.is_first_stage and not first.is_last_stage
    assert first.next_rank == 3
    assert last.prev_rank == 3
    with pytest.raises(PipelineError, match="first pipeline stage"):
        first.prev_rank
    with pytest.raises(PipelineError, match="last pipeline stage"):
        last.next_rank


@pytest.mark.parametrize("layers,pp,expected", [
    (4, 1, [range(0, 4)]),
    (4, 2, [range(0, 2), range(2, 4)]),
    (4, 3, [range(0, 2), range(2, 3), range(3, 4)]),           # first L % pp stages get one extra
    (32, 3, [range(0, 11), range(11, 22), range(22, 32)]),      # TensorRT-LLM: 11/11/10
])
def test_layer_ranges_follow_tensor_split(layers, pp, expected):
    import torch

    got = [Mapping(1, pp, rank=r).layers(layers) for r in range(pp)]
    assert got == expected
    # Same as TensorRT-LLM's Mapping.pp_layers: torch.tensor_split(range(L), pp)[pp_rank].
    assert [list(r) for r in got] == [t.tolist() for t in torch.tensor_split(torch.arange(layers), pp)]


def test_even_split_required_for_fastertransformer():
    assert Mapping(1, 2, rank=1).layers(4, "ft") == range(2, 4)
    with pytest.raises(PipelineError, match="parallel.pp must divide model.num_layers=4 for FasterTransformer"):
        Mapping(1, 3).layers(4, "ft")
    assert Mapping(1, 3).layers(4, "trtllm") == range(0, 2)  # TensorRT-LLM: the first stage gets the extra layer
    with pytest.raises(PipelineError, match="parallel.pp must be <= model.num_layers=4; got 5"):
        Mapping(1, 5).layers(4)


@pytest.mark.parametrize("fmt,tp,pp,match", [
    ("ft", 4, 1, "must divide model.num_kv_heads=2 for FasterTransformer"),
    ("trtllm", 3, 1, "must divide model.num_heads=8; got 3"),
    ("trtllm", 1, 5, "must be <= model.num_layers=4"),
    ("ft", 2, 3, "must divide model.num_layers=4 for FasterTransformer"),
    ("xx", 1, 1, "convert.formats: unknown format 'xx'"),
])
def test_one_layout_check_for_config_converters_and_runner(fmt, tp, pp, match):
    shape = dict(num_heads=8, num_kv_heads=2, num_layers=4, intermediate_size=192)
    with pytest.raises(PipelineError, match=match):
        check_layout(tp, pp, formats=[fmt], **shape)
    check_layout(4, 3, formats=["trtllm"], **shape)  # KV heads replicated, uneven stages: fine for TensorRT-LLM


@pytest.mark.parametrize("kwargs,match", [
    ({"tp": 0}, "parallel.tp must be an integer >= 1"),
    ({"pp": -1}, "parallel.pp must be an integer >= 1"),
    ({"tp": 2.0}, "parallel.tp must be an integer"),
    ({"tp": 2, "pp": 2, "world_size": 3}, r"world_size=3 must equal parallel.tp \* parallel.pp = 2\*2"),
    ({"tp": 2, "rank": 2}, r"rank must be in \[0, 2\)"),
    ({"tp": 2, "rank": -1}, r"rank must be in \[0, 2\)"),
])
def test_invalid_mappings_raise_one_line(kwargs, match):
    with pytest.raises(PipelineError, match=match) as info:
        Mapping(**kwargs)
    assert "\n" not in str(info.value)


def test_world_size_defaults_and_dict():
    m = Mapping(tp=2, pp=4, rank=3)
    assert m.world_size == 8
    assert m.to_dict() == {"world_size": 8, "tp_size": 2, "pp_size": 4}
    assert Mapping(2, 4, rank=3) == m  # a value object
