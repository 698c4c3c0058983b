"""Tiny random models of every supported family (fp32, CPU) and helpers shared by the driver tests."""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text")

# hidden 48, 6 query heads in 2 KV groups (3 heads per group), head_dim 8 (qwen3: 12, not hidden/heads)
_COMMON = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    rms_norm_eps=1e-6,
)


def tiny_config(family: str, *, tie: bool = False, **overrides: Any):
    """A tiny config of ``family`` exercising its peculiarities (biases, sliding layers, head_dim)."""
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    kw = dict(_COMMON, tie_word_embeddings=tie)
    if family == "llama":
        cls = LlamaConfig
        kw.update(attention_bias=True, mlp_bias=True)
    elif family == "mistral":
        cls = MistralConfig
        kw.update(sliding_window=None)
    elif family == "qwen2":
        cls = Qwen2Config
        # layers 2 and 3 use sliding-window attention (window 6): layer_types matter for depth pruning
        kw.update(use_sliding_window=True, sliding_window=6, max_window_layers=2)
    elif family == "qwen3":
        cls = Qwen3Config
        kw.update(head_dim=12, attention_bias=True)
    elif family == "phi3":
        cls = Phi3Config
        kw.update(original_max_position_embeddings=128)
    elif family == "gemma3_text":
        from transformers import Gemma3TextConfig

        cls = Gemma3TextConfig
        # head_dim 12 (not hidden/heads); layers [sliding, full, sliding, full] with a window of 6 tokens
        kw.update(head_dim=12, sliding_window=6, layer_types=["sliding_attention", "full_attention"] * 2,
                  query_pre_attn_scalar=12)
    else:
        raise KeyError(family)
    kw.update(overrides)
    return cls(**kw)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise weights with O(1) activations so pruning differences are visible in logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def make_model(family: str, *, tie: bool = False, seed: int = 0, **overrides: Any):
    """A tiny randomly initialised fp32 ``*ForCausalLM`` of ``family`` in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tie=tie, **overrides))
    randomize_(model, seed)
    if tie:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.float().eval()


def make_batches(vocab: int = 96, *, n: int = 2, batch: int = 3, seq: int = 16, seed: int = 0,
                 pad: bool = True) -> list[dict[str, torch.Tensor]]:
    """Random calibration batches; with ``pad`` the last row of each batch is right-padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if pad:
            mask[-1, seq // 2:] = 0
            ids[-1, seq // 2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def random_scores(model: nn.Module, seed: int = 0, *, lm_loss: bool = True):
    """ImportanceScores with random (distinct) values and the model's fingerprint."""
    from minitron.compress.importance import ImportanceScores
    from minitron.models import get_adapter

    ad = get_adapter(model)
    d = ad.dims(model.config)
    g = torch.Generator().manual_seed(seed)
    heads = torch.rand(d.num_hidden_layers, d.num_attention_heads, generator=g)
    return ImportanceScores(
        heads=heads,
        kv_groups=heads.view(d.num_hidden_layers, d.num_key_value_heads, -1).sum(-1),
        neurons=torch.rand(d.num_hidden_layers, d.intermediate_size, generator=g),
        channels=torch.rand(d.hidden_size, generator=g),
        block_influence=torch.rand(d.num_hidden_layers, generator=g),
        lm_loss_drop=torch.rand(d.num_hidden_layers, generator=g) if lm_loss else None,
        meta={"model_type": ad.model_type, "config_fingerprint": ad.fingerprint(model.config)},
    )


def logits_of(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Concatenated logits of the model on the batches, fp32 [sum(B), S, V] (padding positions zeroed)."""
    outs = []
    with torch.no_grad():
        for b in batches:
            lg = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            outs.append(lg * b["attention_mask"][..., None])
    return torch.cat(outs)


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """Copies of every tensor of the model and of its config dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, model.config.to_dict()


def assert_unchanged(model: nn.Module, snap: tuple[dict[str, torch.Tensor], dict]) -> None:
    state, cfg = snap
    now = model.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), k
    assert model.config.to_dict() == cfg


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def batches() -> list[dict[str, torch.Tensor]]:
    return make_batches()


def _backend() -> str:
    from minitron import _ext

    return "auto" if _ext.available() else "reference"


#: Kernel backend for the driver tests: the compiled kernels when built, else the ops' torch reference.
BACKEND = _backend()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded (and the CPU is shared); restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
