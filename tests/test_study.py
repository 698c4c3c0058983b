"""Tests of the miniature Minitron study (benchmarks/study/experiment.py, benchmarks/minitron_study.py).

The end-to-end test runs the ``--quick`` configuration on the shipped data (every arm, two seeds) and
checks the report; the others check the pieces (weight-magnitude importance, size targets, claims, CLI).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.study import experiment as study
from benchmarks.study.experiment import (
    ARMS,
    MAGNITUDE,
    StudyConfig,
    evaluate_claims,
    non_embedding_parameters,
    run_study,
    summarize,
    weight_magnitude_scores,
    width_targets,
)


def _backend() -> str:
    """The native kernels when the extension is built (as in CI), else the torch reference."""
    from minitron import _ext

    return "auto" if _ext.available() else "reference"


def _data_available() -> bool:
    try:
        for rel in study.DATA_FILES.values():
            study.resolve_data_path(rel)
    except FileNotFoundError:
        return False
    return True


needs_data = pytest.mark.skipif(not _data_available(), reason="shipped data (data/ or ../shared/data) not found")


def _tiny_llama(seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(kw)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**cfg)).float().eval()


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick study (both seeds), shared by the report checks."""
    if not _data_available():
        pytest.skip("shipped data not found")
    out = tmp_path_factory.mktemp("study") / "quick"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and robust on a shared machine
    try:
        cfg = StudyConfig.quick_config(backend=_backend(), scratch_multiplier=2)
        results = run_study(cfg, out, command="python -m benchmarks.minitron_study --quick")
    finally:
        torch.set_num_threads(threads)
    return out, results


def test_quick_study_writes_every_artifact(quick_run):
    out, _ = quick_run
    for name in ("results.json", "results.md", "curves.png", "aggregation.png"):
        assert (out / name).is_file(), name
    for name in ("curves.png", "aggregation.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_quick_study_table_has_every_arm(quick_run):
    out, results = quick_run
    md = (out / "results.md").read_text()
    for key in list(ARMS) + [study.LONG_SCRATCH]:
        row = [line for line in md.splitlines() if line.startswith(f"| {key} |")]
        assert len(row) == 1, f"arm {key} missing from the table"
        assert "**" in row[0]  # the test perplexity cell
    # arm f: the aggregation table with the papers' best highlighted, and weight magnitude
    assert "| seq \\ batch |" in md
    assert "| mean |" in md and "**" in md.split("| seq \\ batch |")[1]
    assert "Weight-magnitude importance" in md
    # every claim has a verdict
    for claim in results["claims"]:
        assert claim["verdict"] and claim["verdict"] != "not measured"
    assert len(results["claims"]) == 6  # four paired claims, the longer-scratch claim, the aggregation claim
    assert "python -m benchmarks.minitron_study --quick" in md


def test_quick_study_numbers(quick_run):
    out, results = quick_run
    seeds = {str(s) for s in results["config"]["seeds"]}
    assert len(seeds) == 2
    vocab = results["teacher"]["config"]["vocab_size"]
    for key, arm in results["arms"].items():
        assert set(arm["seeds"]) == seeds, key
        for run in arm["seeds"].values():
            assert math.isfinite(run["test_ppl"]) and 1 < run["test_ppl"] < 10 * vocab
            # validation curve: step 0 plus one point per eval_every, tokens increasing, training helped
            xs = [p[0] for p in run["curve"]]
            assert xs[0] == 0 and xs == sorted(xs) and len(xs) >= 3
            assert run["curve"][-1][1] < run["curve"][0][1], key
    # pruning roughly halves the non-embedding parameters, for width and depth alike
    teacher = results["teacher"]["non_embedding_parameters"]
    for key in ("c", "d"):
        frac = results["arms"][key]["non_embedding_parameters"] / teacher
        assert 0.4 < frac < 0.6, (key, frac)
    # from scratch starts from a random init; the pruned students start far better
    a0 = results["summary"]["arms"]["a"]["start_val_ppl"]["mean"]
    c0 = results["summary"]["arms"]["c"]["start_val_ppl"]["mean"]
    assert c0 < a0
    # the aggregation sweep covers the configured pairs, the papers' best and weight magnitude, per seed
    for name in ["mean/l2", "l2/mean", "max/max", MAGNITUDE]:
        assert set(results["aggregation"][name]) == seeds, name
    # results.json holds what run_study returned
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))


def test_quick_study_is_deterministic_per_seed(quick_run, tmp_path):
    """Same config and seed -> the same numbers (a rerun of one seed reproduces the table entry)."""
    out, results = quick_run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = StudyConfig.quick_config(backend=_backend(), seeds=[1], aggregations=[("mean", "l2")])
        again = run_study(cfg, tmp_path / "again")
    finally:
        torch.set_num_threads(threads)
    for key in ARMS:
        a, b = results["arms"][key]["seeds"]["1"]["test_ppl"], again["arms"][key]["seeds"]["1"]["test_ppl"]
        assert a == pytest.approx(b, rel=1e-3), key


# ---------------------------------------------------------------------------------------------- refusals
def test_refuses_non_empty_output_before_any_work(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        run_study(StudyConfig.quick_config(backend="reference"), out)
    assert (out / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_overwrite_never_deletes_the_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("t.txt", "v.txt", "e.txt"):
        (data / name).write_text("some text\n")
    cfg = StudyConfig.quick_config(backend="reference", teacher_data=str(data / "t.txt"),
                                   distill_data=str(data / "v.txt"), eval_data=str(data / "e.txt"))
    with pytest.raises(ValueError, match="refusing to overwrite"):
        run_study(cfg, tmp_path, overwrite=True)
    assert (data / "t.txt").is_file()


def test_missing_data_is_refused(tmp_path):
    cfg = StudyConfig.quick_config(backend="reference", eval_data=str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        run_study(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad, match", [
    (dict(aggregations=[("mean", "median")]), "aggregation"),
    (dict(seeds=[0, 0]), "duplicates"),
    (dict(seeds=[]), "seeds"),
    (dict(param_fraction=1.5), "param_fraction"),
    (dict(hidden_size=30, num_attention_heads=4), "multiple"),
    (dict(depth_metric="cosine"), "depth_metric"),
    (dict(student_steps=0), "student_steps"),
])
def test_config_validation(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        StudyConfig.quick_config(**bad)


def test_aggregation_pairs_always_include_papers_best():
    cfg = StudyConfig.quick_config(aggregations=[("max", "max")])
    assert cfg.aggregation_pairs()[0] == ("mean", "l2")
    assert len(StudyConfig().aggregation_pairs()) == 25


# ---------------------------------------------------------------------------------------------- pieces
def test_width_targets_halve_non_embedding_parameters():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    t = width_targets(cfg, 0.5, 0.75)
    assert t["hidden_size"] == 96 and t["hidden_size"] % 4 == 0
    from minitron.models import get_adapter

    pruned = get_adapter(cfg).pruned_config(cfg, **t)
    frac = non_embedding_parameters(pruned) / non_embedding_parameters(cfg)
    assert abs(frac - 0.5) < 0.01
    with pytest.raises(ValueError, match="hidden_ratio"):
        width_targets(cfg, 0.1, 0.9)


def test_weight_magnitude_scores_rank_by_norm_and_prune():
    from minitron.compress.prune import plan_width, prune_width

    model = _tiny_llama()
    layer = model.model.layers[1]
    with torch.no_grad():
        # neuron 5 of layer 1: no weights at all -> least important; neuron 7: huge -> most important
        layer.mlp.gate_proj.weight[5] = 0
        layer.mlp.up_proj.weight[5] = 0
        layer.mlp.down_proj.weight[:, 5] = 0
        layer.mlp.up_proj.weight[7] *= 100
        # query head 2 of layer 1 (KV group 1): zero q rows and o columns
        hd = 32 // 4
        layer.self_attn.q_proj.weight[2 * hd: 3 * hd] = 0
        layer.self_attn.o_proj.weight[:, 2 * hd: 3 * hd] = 0
        # embedding channel 3: zero everywhere
        model.model.embed_tokens.weight[:, 3] = 0
        model.lm_head.weight[:, 3] = 0
        for lay in model.model.layers:
            for lin in (lay.self_attn.q_proj, lay.self_attn.k_proj, lay.self_attn.v_proj, lay.mlp.gate_proj,
                        lay.mlp.up_proj):
                lin.weight[:, 3] = 0
            lay.self_attn.o_proj.weight[3] = 0
            lay.mlp.down_proj.weight[3] = 0
    s = weight_magnitude_scores(model)
    assert s.neurons.shape == (3, 48) and s.heads.shape == (3, 4) and s.kv_groups.shape == (3, 2)
    assert s.channels.shape == (32,) and s.block_influence.shape == (3,) and s.lm_loss_drop is None
    assert s.neurons.dtype == torch.float32 and bool(torch.isfinite(s.neurons).all())
    assert int(s.neurons[1].argmin()) == 5 and float(s.neurons[1, 5]) == 0.0
    assert int(s.neurons[1].argmax()) == 7
    assert int(s.heads[1].argmin()) == 2
    assert int(s.channels.argmin()) == 3 and float(s.channels[3]) == 0.0
    # a KV group scores at least the sum of its query heads
    assert bool((s.kv_groups >= s.heads.view(3, 2, 2).sum(-1) - 1e-6).all())
    # exact value of one neuron: sqrt(|gate row|^2 + |up row|^2 + |down col|^2)
    l0 = model.model.layers[0].mlp
    want = (l0.gate_proj.weight[0].detach().pow(2).sum() + l0.up_proj.weight[0].detach().pow(2).sum()
            + l0.down_proj.weight[:, 0].detach().pow(2).sum()).sqrt()
    assert float(s.neurons[0, 0]) == pytest.approx(float(want), rel=1e-5)
    # the driver accepts them like activation scores
    s.check_compatible(model.config)
    plan = plan_width(model.config, s, intermediate_size=40, hidden_size=28)
    assert 5 not in plan.neurons[1].tolist() and 7 in plan.neurons[1].tolist()
    assert 3 not in plan.hidden.tolist()
    pruned = prune_width(model, s, intermediate_size=40, hidden_size=28, backend=_backend())
    assert pruned.config.intermediate_size == 40 and pruned.config.hidden_size == 28
    out = pruned(input_ids=torch.randint(0, 64, (2, 9))).logits
    assert out.shape == (2, 9, 64)


def test_summarize():
    s = summarize([1.0, 3.0])
    assert s["mean"] == 2.0 and s["sd"] == pytest.approx(math.sqrt(2)) and s["min"] == 1 and s["max"] == 3
    assert summarize([5.0])["sd"] is None
    assert summarize([])["n"] == 0


def _fake_results(ppl: dict, agg: dict | None = None) -> dict:
    arms = {k: {"label": k, "description": k, "tokens": 100, "seeds": {
        str(i): {"test_ppl": v} for i, v in enumerate(vals)}} for k, vals in ppl.items()}
    return {"arms": arms, "aggregation": agg or {}}


def test_evaluate_claims_verdicts():
    res = _fake_results({"a": [50, 52], "b": [30, 29], "c": [20, 21], "d": [19, 25], "e": [10, 11]},
                        agg={"mean/l2": {"0": 40.0, "1": 41.0}, "max/max": {"0": 80.0, "1": 82.0},
                             MAGNITUDE: {"0": 90.0, "1": 95.0}})
    claims = {c["comparison"]: c for c in evaluate_claims(res)}
    assert claims["c < a"]["verdict"] == "holds in every seed"
    assert claims["c < b"]["verdict"] == "holds in every seed"
    assert claims["c < d"]["verdict"] == "mixed (1 of 2 seeds)"
    assert claims["c < e"]["verdict"] == "does not hold in any seed"
    assert claims["f"]["verdict"].startswith("holds")
    assert "mean/l2 ranks 1 of 2" in claims["f"]["evidence"]
    # a consistent but tiny gap is called a tie
    tie = _fake_results({"a": [50, 52], "b": [30, 29], "c": [100, 100], "d": [100.5, 100.4], "e": [10, 11]})
    v = {c["comparison"]: c["verdict"] for c in evaluate_claims(tie)}["c < d"]
    assert v.startswith("holds in every seed") and "tie" in v
    # within the seed spread -> not shown
    res["aggregation"] = {"mean/l2": {"0": 40.0, "1": 50.0}, "max/max": {"0": 41.0, "1": 51.0}}
    f = [c for c in evaluate_claims(res) if c["comparison"] == "f"][0]
    assert f["verdict"].startswith("partly") or f["verdict"].startswith("not shown")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_arguments():
    import argparse

    from benchmarks.minitron_study import _pairs, build_parser, config_from_args

    assert _pairs("mean/l2,max/var") == [("mean", "l2"), ("max", "var")]
    assert len(_pairs("all")) == 25
    with pytest.raises(argparse.ArgumentTypeError, match="SEQ/BATCH"):
        _pairs("mean/median")
    args = build_parser().parse_args(["--quick", "--seeds", "3", "--student-steps", "5", "--backend", "reference"])
    cfg = config_from_args(args)
    assert cfg.quick and cfg.seeds == [0, 1, 2] and cfg.student_steps == 5 and cfg.backend == "reference"
    full = config_from_args(build_parser().parse_args([]))
    assert not full.quick and full.seeds == [0, 1] and full.aggregations is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--seeds", "0"])


def test_cli_refuses_existing_output(tmp_path, capsys):
    from benchmarks.minitron_study import main

    (tmp_path / "x").write_text("mine")
    assert main(["--quick", "--out", str(tmp_path), "--backend", "reference"]) == 2
    assert (tmp_path / "x").read_text() == "mine"
