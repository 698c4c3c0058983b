"""Enumeration from a config alone: the grid, exact parameter counts, KV-cache memory, the papers' shapes, budgets."""
from __future__ import annotations

import copy

import pytest
import torch

from minitron.resources.architectures import load_architecture
from minitron.search import SearchSpaceError, SearchSpec, Shape, count_parameters, enumerate_candidates
from minitron.search.space import (axis_values, check_parameter_formula, embedding_parameters, kv_cache_bytes,
                                   reachable_range, teacher_shape)
from tests.search.conftest import make_model, tiny_config

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


@pytest.mark.parametrize("name,budget,shape,params", [
    ("llama-3.1-8b", 4.52e9, Shape(3072, 9216, 32, 8, 32), 4_512_746_496),  # Llama-3.1-Minitron 4B-Width
    ("mistral-nemo-12b", 8.42e9, Shape(4096, 11520, 32, 8, 40), 8_414_105_600),  # Mistral-NeMo-Minitron 8B
])
def test_the_papers_shapes_are_candidates(name, budget, shape, params):
    cfg = load_architecture(name)
    cands = {c.id: c for c in enumerate_candidates(cfg, SearchSpec(target_params=int(budget)))}
    assert shape.id in cands
    assert cands[shape.id].parameters == params == count_parameters(cfg, shape)
    assert cands[shape.id].kind == "width"
    # the formula agrees with the model transformers builds (meta device: no memory)
    check_parameter_formula(cfg, [shape])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_is_the_numel_of_real_pruned_models(family, tie):
    from minitron.compress.prune import prune_depth, prune_width
    from tests.search.conftest import random_scores

    model = make_model(family, tie=tie)
    full, _ = teacher_shape(model.config)
    assert count_parameters(model.config, full) == sum(p.numel() for p in model.parameters())
    for s in (Shape(32, 48, 4, 2, 3), Shape(48, 64, 2, 1, 4), Shape(40, 16, 6, 2, 2)):
        if family == "llama" and s.hidden_size % s.num_attention_heads:
            continue
        m = copy.deepcopy(model)
        scores = random_scores(model)
        prune_width(m, scores, **s.width())
        prune_depth(m, num_hidden_layers=s.num_hidden_layers, scores=scores)
        assert count_parameters(model.config, s) == sum(p.numel() for p in m.parameters()), (family, s)
    emb = embedding_parameters(model.config, 48)
    assert emb == 96 * 48 * (1 if tie else 2)  # tied embeddings counted once


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_kv_cache_bytes_match_the_cache_a_forward_fills(family):
    model = make_model(family)
    ids = torch.randint(3, 96, (3, 10))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    real = 0
    for layer in cache.layers:
        real += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    full, _ = teacher_shape(model.config)
    assert kv_cache_bytes(model.config, full, seq_len=10, batch=3) == real


def test_axis_values_grid_and_limits():
    assert axis_values(576, 0.4, 64) == [384, 448, 512, 576]
    assert axis_values(100, 0.4, 64) == [64, 100]  # the teacher's own size is always on the grid
    assert axis_values(4096, 0.0, 64) == [4096]
    assert min(axis_values(14336, 0.4, 64)) == 8640  # ceil(0.6 * 14336 = 8601.6) rounded up to the grid


def _spec(**kw):
    base = dict(hidden_multiple=8, mlp_multiple=8, tolerance=0.1)
    base.update(kw)
    return SearchSpec(**base)


def test_candidates_meet_the_budget_closest_from_below_within_the_limits():
    cfg = tiny_config("mistral", num_hidden_layers=10, intermediate_size=128, hidden_size=64, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=8)
    total = count_parameters(cfg, teacher_shape(cfg)[0])
    spec = _spec(target_params=int(total * 0.7), max_width_prune=0.4, max_depth_prune=0.3)
    cands = enumerate_candidates(cfg, spec)
    assert cands and len({c.id for c in cands}) == len(cands)
    fracs = [c.budget_fraction for c in cands]
    assert fracs == sorted(fracs, reverse=True)
    for c in cands:
        s = c.shape
        assert c.parameters <= spec.target_params and c.parameters >= (1 - spec.tolerance) * spec.target_params
        assert s.hidden_size >= 0.6 * 64 and s.intermediate_size >= 0.6 * 128 and s.num_hidden_layers >= 7
        assert s.num_key_value_heads >= 0.6 * 4 and s.num_attention_heads >= 0.6 * 8
        assert s.num_attention_heads % s.num_key_value_heads == 0  # KV groups respected
        assert s.num_attention_heads // s.num_key_value_heads <= 2  # at most a group's own heads
        assert s.hidden_size % 8 == 0 and s.intermediate_size % 8 == 0
        bigger = Shape(s.hidden_size, s.intermediate_size + 8, s.num_attention_heads, s.num_key_value_heads,
                       s.num_hidden_layers)
        assert s.intermediate_size == 128 or count_parameters(cfg, bigger) > spec.target_params  # closest from below
    kinds = {c.kind for c in cands}
    assert "width" in kinds and "width+depth" in kinds


def test_budget_kinds_and_memory():
    cfg = tiny_config("llama", num_hidden_layers=6, tie=True)
    full, hd = teacher_shape(cfg)
    total = count_parameters(cfg, full)
    nonemb = total - embedding_parameters(cfg, full.hidden_size)
    ne = enumerate_candidates(cfg, _spec(target_params=int(nonemb * 0.75), params_kind="non_embedding"))
    assert all(c.non_embedding_parameters <= nonemb * 0.75 for c in ne)
    assert any(c.parameters > nonemb * 0.75 for c in ne)  # the embedding is not counted
    mem_budget = int((total * 4 + kv_cache_bytes(cfg, full, seq_len=64, batch=2)) * 0.8)
    mem = enumerate_candidates(cfg, _spec(target_memory=mem_budget, memory_seq_len=64, memory_batch=2))
    for c in mem:
        assert c.memory_bytes == c.parameters * 4 + 2 * c.shape.num_hidden_layers * c.shape.num_key_value_heads * hd \
            * 64 * 2 * 4
        assert 0.9 * mem_budget <= c.memory_bytes <= mem_budget
    both = enumerate_candidates(cfg, _spec(target_params=int(total * 0.8), target_memory=mem_budget,
                                           memory_seq_len=64, memory_batch=2))
    assert all(c.memory_bytes <= mem_budget and c.parameters <= total * 0.8 for c in both)


def test_unreachable_budgets_name_the_smallest_and_largest_sizes():
    cfg = tiny_config("llama", num_hidden_layers=6)
    total = count_parameters(cfg, teacher_shape(cfg)[0])
    lo, hi = reachable_range(cfg, _spec(target_params=1))
    assert hi.parameters == total and lo.parameters < total
    with pytest.raises(SearchSpaceError, match=f"{lo.parameters:,} to {total:,} parameters") as e:
        enumerate_candidates(cfg, _spec(target_params=lo.parameters - 1))
    assert "below the smallest" in str(e.value)
    with pytest.raises(SearchSpaceError, match=f"at or above the model's own size.*{total:,} parameters"):
        enumerate_candidates(cfg, _spec(target_params=total + 10))
    assert enumerate_candidates(cfg, _spec(target_params=lo.parameters))  # the smallest shape itself is reachable


@pytest.mark.parametrize("kw,match", [
    (dict(target_params=100, max_width_prune=1.0), "max_width_prune must be a number in \\[0, 1\\)"),
    (dict(target_params=100, max_depth_prune=-0.1), "max_depth_prune"),
    (dict(target_params=100, top_k=0), "top_k must be an int >= 1"),
    (dict(target_params=100, tolerance=1.5), "tolerance"),
    (dict(), "give a budget"),
    (dict(target_params=0), "target_params must be a positive int"),
    (dict(target_params=100, rank_by="ppl"), "rank_by"),
])
def test_search_spec_refuses_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        SearchSpec(**kw)


def test_parse_count():
    from minitron.search import parse_count

    assert parse_count("4.52e9") == 4_520_000_000 == parse_count("4.52B")
    assert parse_count("80M") == 80_000_000 == parse_count("80_000_000")
    with pytest.raises(Exception, match="parameter count"):
        parse_count("lots")
