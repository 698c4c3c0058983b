"""Gemma-3 text adapter (``Gemma3ForCausalLM``, model_type ``gemma3_text``).

The Llama projection layout (separate ``q``/``k``/``v``/``o`` and ``gate``/``up``/``down``) with four
residual-width norms per layer, per-head ``q_norm``/``k_norm``, an embedding scaled by sqrt(hidden_size)
inside the model, tied embeddings and a sliding/full attention pattern. See ``docs/gemma3.md``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from minitron.models.base import ModelAdapter

#: Elements per chunk of :func:`rescale_embedding` (64 MiB of fp32 temporaries).
_CHUNK_ELEMENTS = 1 << 24

__all__ = ["Gemma3Adapter", "MULTIMODAL_MESSAGE", "embed_scale_factor", "rescale_embedding", "rescale_norm_weight"]

#: Why ``Gemma3ForConditionalGeneration`` (model_type ``gemma3``, the 4B/12B/27B image+text checkpoints) is refused.
MULTIMODAL_MESSAGE = (
    "model_type 'gemma3' is the image+text Gemma3ForConditionalGeneration (vision tower, projector and the "
    "language model); minitron prunes the text model only: use a text-only checkpoint (Gemma3ForCausalLM, "
    "config model_type 'gemma3_text', e.g. gemma-3-270m or gemma-3-1b), or extract the language model first: "
    "text = Gemma3ForCausalLM(mm.config.text_config); "
    "text.model.load_state_dict(mm.model.language_model.state_dict()); text.save_pretrained(folder)"
)


def embed_scale_factor(hidden_before: int, hidden_after: int, dtype: torch.dtype = torch.float32) -> float:
    """``c``: the factor the kept embedding rows are multiplied by, ``sqrt(hidden_before / hidden_after)`` as the
    model applies it in ``dtype``.

    transformers builds ``Gemma3TextScaledWordEmbedding`` with ``embed_scale = hidden_size ** 0.5`` from the
    config and multiplies by ``embed_scale.to(weight.dtype)``, so a reloaded pruned model scales by
    ``q(sqrt(hidden_after))`` where the cut teacher scaled by ``q(sqrt(hidden_before))``, ``q`` rounding to
    ``dtype`` (in bf16 sqrt(1152) = 33.94 becomes 34.0). ``c = q(sqrt(H0)) / q(sqrt(H1))`` restores the
    teacher's product exactly up to the rounding of the rescaled rows.
    """
    if hidden_before < 1 or hidden_after < 1:
        raise ValueError(f"hidden sizes must be >= 1, got {hidden_before} -> {hidden_after}")

    def q(x: float) -> float:
        return float(torch.tensor(x, dtype=torch.float64).to(dtype))

    return q(math.sqrt(hidden_before)) / q(math.sqrt(hidden_after))


def rescale_embedding(weight: torch.Tensor, c: float) -> torch.Tensor:
    """The embedding [vocab, hidden] times ``c``, computed in fp32 (fp64 for fp64 weights), in ``weight``'s dtype.

    Works through the rows in chunks of about :data:`_CHUNK_ELEMENTS` elements, so a bf16 Gemma-3 embedding
    (262k x 5376 = 2.8 GB) needs one output tensor and a small fp32 temporary, not a full fp32 copy.
    """
    wide = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if weight.dim() < 2:
        return (weight.to(wide) * c).to(weight.dtype)
    out = torch.empty_like(weight)
    rows = max(1, _CHUNK_ELEMENTS // max(1, math.prod(weight.shape[1:])))
    for i in range(0, weight.shape[0], rows):
        out[i:i + rows].copy_(weight[i:i + rows].to(wide) * c)
    return out


def rescale_norm_weight(weight: torch.Tensor, c: float) -> torch.Tensor:
    """A Gemma RMSNorm weight [hidden] whose ``(1 + w')`` is ``(1 + w) / c``: ``w' = (1 + w) / c - 1``.

    ``Gemma3RMSNorm`` multiplies the fp32-normalised input by ``1.0 + weight.float()``; computed in fp32
    (fp64 for fp64 weights), returned in ``weight``'s dtype.
    """
    wide = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return ((1.0 + weight.to(wide)) / c - 1.0).to(weight.dtype)


class Gemma3Adapter(ModelAdapter):
    """Gemma-3 text (``Gemma3ForCausalLM``, config ``Gemma3TextConfig``).

    Width:

    * **hidden** cuts the embedding columns (the tied LM head is the same tensor), all four norms of every
      layer (``input_layernorm``, ``post_attention_layernorm``, ``pre_feedforward_layernorm``,
      ``post_feedforward_layernorm``), the final norm and every projection's hidden rows/columns. Channel
      importance sums the outputs of all four layer norms and the final norm (the two pre-norms feed the
      attention/MLP, the two post-norms are what each block writes into the residual stream).
    * **embedding scale**: the model multiplies the embedding by ``sqrt(hidden_size)`` taken from the
      config. After ``H0 -> H1`` the kept embedding rows are multiplied by ``c = sqrt(H0 / H1)`` and, since
      the LM head is tied to them, the final norm weight becomes ``w' = (1 + w) / c - 1`` so the logits are
      unchanged (:meth:`width_transforms`); in memory the embedding's ``embed_scale`` buffer is set to
      ``sqrt(H1)`` as a reload would (:meth:`sync_pruned_modules`).
    * **heads / KV heads** keep ``head_dim`` (independent of hidden / heads); ``q_norm``/``k_norm`` act on
      ``head_dim`` and are unchanged. ``query_pre_attn_scalar`` (the attention scale ``1/sqrt(q)``) is a
      constant of the checkpoint and is never changed. transformers requires ``hidden_size`` to be a
      multiple of ``num_attention_heads`` even though ``head_dim`` is explicit.
    * **MLP width**: ``gate_proj``/``up_proj`` rows and ``down_proj`` columns.

    Depth rule: each kept layer keeps its own type (``sliding_attention`` or ``full_attention``), because its
    weights were trained with that attention span; ``layer_types`` is cut to the kept layers (the pattern
    is not re-derived), and the legacy ``sliding_window_pattern`` is removed from the config when the kept
    types no longer follow it, so a reload uses the saved ``layer_types``. ``rope_parameters`` (one entry per
    layer type) and ``sliding_window`` are kept.
    """

    model_type = "gemma3_text"
    #: model types refused with an explanation instead of "unsupported" (see ``docs/gemma3.md``).
    refused_model_types: ClassVar[dict[str, str]] = {"gemma3": MULTIMODAL_MESSAGE}

    # ------------------------------------------------------------------ layout
    def layer_norms(self, layer: nn.Module) -> list[nn.Module]:
        """The four hidden-width norms of a Gemma-3 layer, in forward order."""
        return [layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                layer.post_feedforward_layernorm]

    def base_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (``model.model``), with its embedding scale kept equal to sqrt(config.hidden_size).

        transformers computes ``embed_tokens.embed_scale`` (a non-persistent buffer, never in a checkpoint)
        from the config at construction. Every access here re-establishes that invariant (a check of one Python
        float, no device sync): after width pruning has written the new hidden size into the config, the buffer
        becomes sqrt(new hidden size), as a reload would build it; on a model built on the ``meta`` device (the
        streamed paths' skeleton) the buffer is created on the CPU, so loading the weight alone makes the
        embedding usable. See :meth:`sync_pruned_modules`.
        """
        base = model.model
        self.sync_pruned_modules(model, base)
        return base

    def check_model(self, model: nn.Module) -> None:
        """As the base class, and refuse the image+text model (``Gemma3ForConditionalGeneration``) clearly."""
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) == "gemma3" or hasattr(getattr(model, "model", None), "language_model"):
            raise TypeError(MULTIMODAL_MESSAGE)
        super().check_model(model)

    # ------------------------------------------------------------------ config
    def check_config(self, config: Any) -> None:
        """Gemma-3 rules first (clear messages), then transformers' own validation.

        * ``hidden_size % num_attention_heads == 0`` (``Gemma3TextConfig.validate_architecture`` insists
          although ``head_dim`` is explicit);
        * ``layer_types`` has one entry per layer, each ``sliding_attention`` or ``full_attention``.
        """
        hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
        if hidden % heads:
            raise ValueError(
                f"gemma3_text: hidden_size={hidden} is not a multiple of num_attention_heads={heads}; "
                "transformers' Gemma3TextConfig refuses such a config (at construction and from_pretrained) even "
                "though head_dim is explicit: choose hidden_size and num_attention_heads so that the heads divide "
                "the hidden size"
            )
        types = getattr(config, "layer_types", None)
        if types is not None:
            if len(types) != int(config.num_hidden_layers):
                raise ValueError(f"gemma3_text: layer_types has {len(types)} entries for "
                                 f"num_hidden_layers={config.num_hidden_layers}")
            bad = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
            if bad:
                raise ValueError(f"gemma3_text: unknown layer_types {bad}")
        super().check_config(config)

    def cut_per_layer_config(self, config: Any, kept: list[int]) -> None:
        """Cut ``layer_types`` to the kept layers (each keeps its own sliding/full type), then drop the legacy
        ``sliding_window_pattern`` when the kept types no longer follow it (``layer_types`` is saved and wins)."""
        super().cut_per_layer_config(config, kept)
        types = getattr(config, "layer_types", None)
        pattern = _pattern_of(config)
        if types is None or pattern is None:
            return
        if list(types) != _pattern_types(pattern, len(types)):
            for name in ("sliding_window_pattern", "_sliding_window_pattern"):
                if name in config.__dict__:
                    delattr(config, name)

    # ------------------------------------------------------------------ width compensation
    def width_transforms(self, config_before: Any, config_after: Any) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Functions applied to state-dict tensors after the width cuts: the embedding-scale compensation.

        With ``H0 = config_before.hidden_size`` and ``H1 = config_after.hidden_size``, ``c = sqrt(H0 / H1)`` (as the
        model rounds the two scales in the tensor's dtype, :func:`embed_scale_factor`):
        ``model.embed_tokens.weight`` [vocab, H1] is multiplied by ``c`` (a reload scales by sqrt(H1), the cut
        teacher by sqrt(H0)) and, the LM head being tied to it, ``model.norm.weight`` [H1] becomes
        ``(1 + w) / c - 1`` so the logits stay those of the cut teacher. An untied LM head needs no final-norm
        change. Empty when the hidden size does not change (bit-identical).
        """
        h0, h1 = int(config_before.hidden_size), int(config_after.hidden_size)
        if h0 == h1:
            return {}
        out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "model.embed_tokens.weight": lambda w: rescale_embedding(w, embed_scale_factor(h0, h1, w.dtype))}
        if bool(getattr(config_after, "tie_word_embeddings", True)):
            out["model.norm.weight"] = lambda w: rescale_norm_weight(w, embed_scale_factor(h0, h1, w.dtype))
        return out

    def sync_pruned_modules(self, model: nn.Module, base: Optional[nn.Module] = None) -> None:
        """Set the embedding's ``embed_scale`` buffer (and ``scalar_embed_scale``) to ``sqrt(config.hidden_size)``
        as a reload of the pruned config would build it; create the buffer on the CPU when it is on ``meta``.
        A no-op when already so (compares a Python float; no device sync)."""
        base = model.model if base is None else base
        emb = getattr(base, "embed_tokens", None)
        buf = getattr(emb, "embed_scale", None)
        if not isinstance(buf, torch.Tensor):
            return
        scale = float(model.config.hidden_size) ** 0.5
        if buf.is_meta:
            emb.embed_scale = torch.tensor(scale, dtype=buf.dtype, device="cpu")
            emb.scalar_embed_scale = scale
        elif getattr(emb, "scalar_embed_scale", None) != scale:
            with torch.no_grad():
                buf.fill_(scale)
            emb.scalar_embed_scale = scale


def _pattern_of(config: Any) -> Optional[int]:
    """The legacy integer ``sliding_window_pattern`` stored on ``config`` (public or private name), if any."""
    for name in ("sliding_window_pattern", "_sliding_window_pattern"):
        value = config.__dict__.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _pattern_types(pattern: int, num_layers: int) -> list[str]:
    """``layer_types`` as ``Gemma3TextConfig`` derives them from ``sliding_window_pattern`` (every pattern-th
    layer full attention)."""
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
