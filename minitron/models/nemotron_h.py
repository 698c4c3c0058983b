"""Nemotron-H adapter: the hybrid Mamba-2 / attention / MLP / MoE decoder (``NemotronHForCausalLM``).

Checked against transformers 5.25 (``models/nemotron_h/modeling_nemotron_h.py``). Unlike the Llama layout, a
Nemotron-H decoder layer (``NemotronHBlock``) holds ONE mixer and ONE pre-norm, with its own residual::

    h = h + layer.mixer(layer.norm(h))          # layer.norm: RMSNorm [hidden_size]

and the mixer's kind comes from ``config.layers_block_type[i]`` (the legacy string
``hybrid_override_pattern``, one character per layer, is converted into that list by the config and is
*not* written back to ``config.json``):

=======  =====================  =======================================================================
pattern  ``layers_block_type``  mixer
=======  =====================  =======================================================================
``M``    ``linear_attention``   ``NemotronHMamba2Mixer``: Mamba-2 (SSD), see :class:`MambaLayout`
``*``    ``full_attention``     ``NemotronHAttention``: GQA ``q/k/v/o_proj``, no bias, no RoPE (NoPE)
``-``    ``mlp``                ``NemotronHMLP``: ``up_proj`` -> relu2 -> ``down_proj`` (not gated)
``E``    ``moe``                ``NemotronHMoE``: router ``gate.weight`` [E, H] (+ ``e_score_correction_bias``
                                [E]), fused experts ``experts.up_proj`` [E, I, H'] / ``experts.down_proj``
                                [E, H', I] (H' = ``moe_latent_size`` or hidden), ``shared_experts`` (an MLP),
                                optional ``fc1_latent_proj`` [H', H] / ``fc2_latent_proj`` [H, H']
=======  =====================  =======================================================================

Model-level modules: ``model.model.embeddings`` (not ``embed_tokens``), ``model.model.norm_f`` (not
``norm``), ``model.lm_head`` (not tied by default).

What the compress code must know (the base adapter assumes every layer has ``self_attn`` *and* ``mlp``):

* :meth:`NemotronHAdapter.attention` / :meth:`~NemotronHAdapter.mlp` (and everything built on them: ``o_proj``,
  ``down_proj``, the row spans, ``attention_inputs``, ``mlp_inputs``) raise ``TypeError`` on a layer of another
  kind; callers must first ask :meth:`~NemotronHAdapter.layer_kind` and skip heads/neurons on other layers.
* The MLP is not gated: there is no ``gate_proj``; its neurons are the rows of ``up_proj`` only
  (:meth:`~NemotronHAdapter.mlp_row_spans`). :meth:`~NemotronHAdapter.gate_rows` raises.
* Every parameter indexed by the embedding channels is listed per layer by
  :meth:`~NemotronHAdapter.hidden_axes` as ``(module, parameter name, dim)`` (3-D expert tensors included),
  so hidden-size pruning needs no per-kind code. :meth:`~NemotronHAdapter.residual_writers` and
  :meth:`~NemotronHAdapter.hidden_readers` give the same per kind.
* ``layer_norms(layer)`` is ``[layer.norm]`` (one norm per layer); the final norm is ``norm_f``.
* Module bookkeeping after width pruning must be kind-aware: the Mamba mixer has its own ``num_heads``,
  ``head_dim`` and ``intermediate_size`` (= mamba heads x head dim), which a generic "set every
  ``num_heads`` to the attention head count" would corrupt, and its gated norm's ``group_size`` must follow.
  :meth:`~NemotronHAdapter.sync_module_attributes` rewrites all of them from the model's config.
* Depth: each layer is one mixer with its own residual, so a dropped "block" is simply a run of layers of any
  kinds; ``layers_block_type`` is cut with them (:attr:`per_layer_config_fields`). The layer-skip module used by
  the LM-loss metric must expose ``block_type`` (``NemotronHModel.forward`` reads ``layer.block_type`` to pick the
  layer's mask).
* On disk, ``save_pretrained`` writes the decoder under ``backbone.`` (``backbone.embeddings.weight``,
  ``backbone.layers.N...``, ``backbone.norm_f.weight``; ``lm_head.weight`` unchanged) and the MoE experts as one
  2-D tensor per expert (``mixer.experts.{e}.up_proj.weight`` [I, H']); transformers renames/merges them on
  load. Streamed code that reads checkpoint tensors by in-memory name must map them:
  :meth:`~NemotronHAdapter.checkpoint_prefix` / :meth:`~NemotronHAdapter.checkpoint_name`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Optional

from torch import nn

from minitron.models.base import Dims, ModelAdapter, RowSpan

__all__ = ["NemotronHAdapter", "MambaLayout", "LAYER_KINDS", "PATTERN_CHARS", "BLOCK_TYPE_KIND"]

#: The four layer kinds of a Nemotron-H model.
LAYER_KINDS = ("mamba", "attention", "mlp", "moe")
#: ``hybrid_override_pattern`` character -> layer kind.
PATTERN_CHARS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
#: ``layers_block_type`` entry (transformers 5.25 names, legacy names too) -> layer kind.
BLOCK_TYPE_KIND = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention",
                   "attention": "attention", "mlp": "mlp", "moe": "moe"}
_KIND_CHAR = {v: k for k, v in PATTERN_CHARS.items()}


@dataclass(frozen=True)
class MambaLayout:
    """Geometry of one Mamba-2 mixer (every Mamba layer of a model shares it), from the config.

    With ``H = num_heads``, ``P = head_dim``, ``G = n_groups``, ``N = state_size`` and ``D = d_inner = H * P``
    (transformers 5.25 derives ``d_inner`` from heads x head dim; ``config.expand`` is not read):

    * ``mixer.in_proj.weight`` ``[2*D + 2*G*N + H, hidden]`` (+ bias when ``use_bias``): output rows
      ``[z (D) | x (D) | B (G*N) | C (G*N) | dt (H)]`` in that order (``projected_states.split([D, D+2GN, H])``
      then the middle part split ``[D, G*N, G*N]`` after the convolution). ``z`` is the gate of the norm.
    * ``mixer.conv1d.weight`` ``[D + 2*G*N, 1, conv_kernel]`` and ``conv1d.bias`` ``[D + 2*G*N]``: depthwise,
      one channel per row of ``[x | B | C]`` (z and dt are not convolved).
    * ``mixer.A_log``, ``mixer.D``, ``mixer.dt_bias``: ``[H]``, one per head.
    * ``mixer.norm.weight`` ``[D]``: gated RMSNorm ``w * g / rms_group(g)`` with ``g = y * silu(z)``; the RMS is
      taken over ``D / G`` consecutive channels, i.e. over the ``H / G`` heads of one SSM group together.
    * ``mixer.out_proj.weight`` ``[hidden, D]`` (+ bias): input columns head-major (head ``h`` owns columns
      ``h*P .. h*P + P - 1``), the same channel order as ``x``, ``z`` and the norm.
    * Head ``h`` reads ``B`` and ``C`` of group ``h // (H / G)`` (``repeat_interleave`` over heads): heads are
      laid out group-major, so keeping heads group-aware keeps each head with its own B/C.
    * Within group ``g``, ``B`` rows are ``g*N .. g*N + N - 1`` of the B block (same for C).
    """

    num_heads: int
    head_dim: int
    n_groups: int
    state_size: int
    conv_kernel: int

    @property
    def d_inner(self) -> int:
        """Channels of x, z, the norm and out_proj's input: num_heads * head_dim."""
        return self.num_heads * self.head_dim

    @property
    def heads_per_group(self) -> int:
        """Mamba heads sharing one group's B and C."""
        return self.num_heads // self.n_groups

    @property
    def group_state(self) -> int:
        """Rows of B (or of C): n_groups * state_size."""
        return self.n_groups * self.state_size

    @property
    def conv_dim(self) -> int:
        """Channels of conv1d: x, B and C."""
        return self.d_inner + 2 * self.group_state

    @property
    def in_proj_rows(self) -> int:
        """Output rows of in_proj: z, x, B, C, dt."""
        return 2 * self.d_inner + 2 * self.group_state + self.num_heads

    def in_proj_spans(self) -> dict[str, tuple[int, int]]:
        """``name -> (start, stop)`` rows of ``in_proj.weight`` for ``z``, ``x``, ``B``, ``C``, ``dt``."""
        d, gn = self.d_inner, self.group_state
        return {"z": (0, d), "x": (d, 2 * d), "B": (2 * d, 2 * d + gn), "C": (2 * d + gn, 2 * d + 2 * gn),
                "dt": (2 * d + 2 * gn, 2 * d + 2 * gn + self.num_heads)}

    def conv_spans(self) -> dict[str, tuple[int, int]]:
        """``name -> (start, stop)`` channels of ``conv1d`` for ``x``, ``B``, ``C``."""
        d, gn = self.d_inner, self.group_state
        return {"x": (0, d), "B": (d, d + gn), "C": (d + gn, d + 2 * gn)}

    def norm_group_size(self) -> int:
        """Channels normalised together by the gated norm: d_inner / n_groups."""
        return self.d_inner // self.n_groups


class NemotronHAdapter(ModelAdapter):
    """Nemotron-H (``NemotronHForCausalLM``, model_type ``nemotron_h``): hybrid Mamba-2 / attention / MLP / MoE.

    See the module docstring for the layout and what the compress code must do differently.
    """

    model_type = "nemotron_h"
    #: ``layers_block_type`` is the per-layer list (``layer_types`` is an alias of it in the config class:
    #: listing both would cut the list twice).
    per_layer_config_fields: ClassVar[tuple[str, ...]] = ("layers_block_type",)
    #: Config fields of the Mamba axes (prunable: heads, head dim, state size).
    mamba_fields: ClassVar[tuple[str, ...]] = ("mamba_num_heads", "mamba_head_dim", "ssm_state_size")

    # ------------------------------------------------------------------ config
    def layer_kinds(self, config: Any) -> list[str]:
        """Kind of every layer (``"mamba"``, ``"attention"``, ``"mlp"``, ``"moe"``) from ``layers_block_type``.

        Raises:
            ValueError: an unknown block type (naming ``layers_block_type`` / ``hybrid_override_pattern``).
        """
        types = getattr(config, "layers_block_type", None)
        if types is None:
            pattern = getattr(config, "hybrid_override_pattern", None)
            if not isinstance(pattern, str):
                raise ValueError("nemotron_h config has neither layers_block_type nor hybrid_override_pattern")
            return self.kinds_from_pattern(pattern)
        bad = [t for t in types if t not in BLOCK_TYPE_KIND]
        if bad:
            raise ValueError(f"layers_block_type (hybrid_override_pattern) holds unknown layer types {sorted(set(bad))}; "
                             f"known: {sorted(BLOCK_TYPE_KIND)}")
        return [BLOCK_TYPE_KIND[t] for t in types]

    @staticmethod
    def kinds_from_pattern(pattern: str) -> list[str]:
        """Layer kinds of a ``hybrid_override_pattern`` string (``M``, ``*``, ``-``, ``E``); ValueError naming it."""
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"hybrid_override_pattern must be a non-empty string of M, *, -, E; got {pattern!r}")
        bad = sorted({c for c in pattern if c not in PATTERN_CHARS})
        if bad:
            raise ValueError(f"hybrid_override_pattern {pattern!r} holds unknown characters {bad}; "
                             "use M (Mamba-2), * (attention), - (MLP), E (MoE)")
        return [PATTERN_CHARS[c] for c in pattern]

    def pattern(self, config: Any) -> str:
        """The ``hybrid_override_pattern`` string of ``config`` (one character per layer)."""
        return "".join(_KIND_CHAR[k] for k in self.layer_kinds(config))

    def layers_of_kind(self, config: Any, kind: str) -> list[int]:
        """Indices of the layers of ``kind``."""
        if kind not in LAYER_KINDS:
            raise ValueError(f"kind must be one of {LAYER_KINDS}, got {kind!r}")
        return [i for i, k in enumerate(self.layer_kinds(config)) if k == kind]

    def mamba_layout(self, config: Any) -> MambaLayout:
        """The Mamba-2 geometry of ``config`` (see :class:`MambaLayout`)."""
        return MambaLayout(num_heads=int(config.mamba_num_heads), head_dim=int(config.mamba_head_dim),
                           n_groups=int(config.n_groups), state_size=int(config.ssm_state_size),
                           conv_kernel=int(config.conv_kernel))

    def fingerprint(self, config: Any) -> dict[str, Any]:
        fp = super().fingerprint(config)
        fp.update({"hybrid_override_pattern": self.pattern(config), "mamba_num_heads": int(config.mamba_num_heads),
                   "mamba_head_dim": int(config.mamba_head_dim), "n_groups": int(config.n_groups),
                   "ssm_state_size": int(config.ssm_state_size)})
        if "moe" in self.layer_kinds(config):
            fp.update({"n_routed_experts": int(config.n_routed_experts),
                       "moe_intermediate_size": int(config.moe_intermediate_size),
                       "moe_shared_expert_intermediate_size": int(config.moe_shared_expert_intermediate_size)})
        return fp

    def pruned_config(self, config: Any, **sizes: int) -> Any:
        """A deep copy of ``config`` with the given sizes set; also accepts the Mamba fields
        ``mamba_num_heads``, ``mamba_head_dim``, ``ssm_state_size`` (``head_dim`` written explicitly)."""
        head_dim = self.head_dim(config)
        new = copy.deepcopy(config)
        for name, value in sizes.items():
            setattr(new, name, int(value))
        new.head_dim = head_dim
        return new

    def check_config(self, config: Any) -> None:
        """Nemotron-H rules: ``mamba_num_heads`` a multiple of ``n_groups`` (each group keeps the same number of
        heads; the norm groups ``d_inner / n_groups`` channels), then transformers' own validation."""
        heads, groups = int(config.mamba_num_heads), int(config.n_groups)
        if heads < 1 or groups < 1 or heads % groups:
            raise ValueError(
                f"mamba_num_heads={heads} (--mamba-num-heads) must be a positive multiple of n_groups={groups}: "
                "every SSM group keeps the same number of Mamba heads")
        for name in ("mamba_head_dim", "ssm_state_size"):
            if int(getattr(config, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
        kinds = self.layer_kinds(config)
        if "mamba" in kinds and "attention" not in kinds:
            raise ValueError(
                f"hybrid_override_pattern {self.pattern(config)!r} has Mamba layers but no attention (*) layer: "
                "transformers 5.25 cannot run such a NemotronH model with a cache (generate fails in "
                "Cache.get_mask_sizes: 'can only be called on Attention layers'); keep at least one attention layer")
        super().check_config(config)

    # ------------------------------------------------------------------ model-level modules
    def check_model(self, model: nn.Module) -> None:
        """Raise ``TypeError`` unless ``model`` is a ``NemotronHForCausalLM``-like model whose layers match the
        config's ``layers_block_type`` (ValueError naming ``hybrid_override_pattern`` otherwise)."""
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        missing = [n for n in ("lm_head",) if not hasattr(model, n)]
        base = getattr(model, "model", None)
        if base is None:
            missing.append("model")
        else:
            missing += [f"model.{n}" for n in ("embeddings", "layers", "norm_f") if not hasattr(base, n)]
        if missing:
            raise TypeError(f"model must be a nemotron_h *ForCausalLM model (AutoModelForCausalLM); "
                            f"{type(model).__name__} has no {', '.join(missing)}")
        kinds = self.layer_kinds(model.config)
        found = [self.layer_kind(layer) for layer in base.layers]
        if found[: len(kinds)] != kinds or len(found) < len(kinds):
            raise ValueError(f"hybrid_override_pattern {self.pattern(model.config)!r} of the config does not match "
                             f"the model's layers {''.join(_KIND_CHAR[k] for k in found)!r}")

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return self.base_model(model).embeddings

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.base_model(model).norm_f

    # ------------------------------------------------------------------ per-layer modules
    def layer_kind(self, layer: nn.Module) -> str:
        """Kind of a decoder layer (from its ``block_type``)."""
        bt = getattr(layer, "block_type", None)
        if bt not in BLOCK_TYPE_KIND:
            raise TypeError(f"not a Nemotron-H layer (block_type {bt!r}): {type(layer).__name__}")
        return BLOCK_TYPE_KIND[bt]

    def mixer(self, layer: nn.Module) -> nn.Module:
        """The layer's mixer (Mamba-2, attention, MLP or MoE module)."""
        return layer.mixer

    def _mixer_of(self, layer: nn.Module, kind: str) -> nn.Module:
        found = self.layer_kind(layer)
        if found != kind:
            raise TypeError(f"this Nemotron-H layer is of kind {found!r}, not {kind!r}: ask layer_kind() first "
                            "(compress code must skip the axes a layer kind lacks)")
        return layer.mixer

    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention mixer (TypeError on a layer of another kind)."""
        return self._mixer_of(layer, "attention")

    def mlp(self, layer: nn.Module) -> nn.Module:
        """The MLP mixer (TypeError on a layer of another kind; MoE shared experts: :meth:`moe`)."""
        return self._mixer_of(layer, "mlp")

    def mamba(self, layer: nn.Module) -> nn.Module:
        """The Mamba-2 mixer (TypeError on a layer of another kind)."""
        return self._mixer_of(layer, "mamba")

    def moe(self, layer: nn.Module) -> nn.Module:
        """The MoE mixer (TypeError on a layer of another kind)."""
        return self._mixer_of(layer, "moe")

    def layer_norms(self, layer: nn.Module) -> list[nn.Module]:
        """The layer's one residual-stream pre-norm (weight [hidden_size])."""
        return [layer.norm]

    def has_attention(self, layer: nn.Module) -> bool:
        return self.layer_kind(layer) == "attention"

    def has_mlp(self, layer: nn.Module) -> bool:
        """Dense MLP layers only (``-``); the MoE layers (``E``) are not pruned by neuron (only by hidden size)."""
        return self.layer_kind(layer) == "mlp"

    def is_mamba_layer(self, layer: nn.Module) -> bool:
        return self.layer_kind(layer) == "mamba"

    def extra_width_sizes(self, config: Any) -> dict[str, int]:
        """``mamba_num_heads`` and ``mamba_head_dim`` when the model has Mamba layers."""
        if "mamba" not in self.layer_kinds(config):
            return {}
        return {"mamba_num_heads": int(config.mamba_num_heads), "mamba_head_dim": int(config.mamba_head_dim)}

    def gate_rows(self, layer: nn.Module, dims: Dims) -> RowSpan:
        raise TypeError("the Nemotron-H MLP is not gated (up_proj -> relu2 -> down_proj): use mlp_row_spans()")

    def mlp_row_spans(self, layer: nn.Module, dims: Dims) -> list[RowSpan]:
        """Rows producing the MLP neurons: ``up_proj`` only (unit = one neuron)."""
        return [self.up_rows(layer, dims)]

    def mlp_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        return [self.mlp(layer).up_proj]

    def mamba_in_proj(self, layer: nn.Module) -> nn.Linear:
        """``mixer.in_proj`` of a Mamba layer: rows [z | x | B | C | dt] (:meth:`MambaLayout.in_proj_spans`)."""
        return self.mamba(layer).in_proj

    def mamba_out_proj(self, layer: nn.Module) -> nn.Linear:
        """``mixer.out_proj`` of a Mamba layer: input columns = the d_inner channels, head-major."""
        return self.mamba(layer).out_proj

    def hidden_readers(self, layer: nn.Module) -> list[tuple[nn.Module, str, int]]:
        """``(module, parameter, dim)`` of the weights reading the normed residual stream (hidden on ``dim``)."""
        kind, m = self.layer_kind(layer), layer.mixer
        if kind == "mamba":
            return [(m.in_proj, "weight", 1)]
        if kind == "attention":
            return [(m.q_proj, "weight", 1), (m.k_proj, "weight", 1), (m.v_proj, "weight", 1)]
        if kind == "mlp":
            return [(m.up_proj, "weight", 1)]
        out = [(m.gate, "weight", 1), (m.shared_experts.up_proj, "weight", 1)]
        if isinstance(m.fc1_latent_proj, nn.Linear):
            out.append((m.fc1_latent_proj, "weight", 1))
        else:
            out.append((m.experts, "up_proj", 2))  # [E, I, hidden]
        return out

    def hidden_writers(self, layer: nn.Module) -> list[tuple[nn.Module, str, int]]:
        """``(module, parameter, dim)`` of the weights (and biases) writing the residual stream."""
        kind, m = self.layer_kind(layer), layer.mixer
        if kind == "mamba":
            mods = [m.out_proj]
        elif kind == "attention":
            mods = [m.o_proj]
        elif kind == "mlp":
            mods = [m.down_proj]
        else:
            mods = [m.shared_experts.down_proj]
        out = [(mod, n, 0) for mod in mods for n in ("weight", "bias") if getattr(mod, n, None) is not None]
        if kind == "moe":
            if isinstance(m.fc2_latent_proj, nn.Linear):
                out += [(m.fc2_latent_proj, n, 0) for n in ("weight", "bias")
                        if getattr(m.fc2_latent_proj, n, None) is not None]
            else:
                out.append((m.experts, "down_proj", 1))  # [E, hidden, I]
        return out

    def hidden_axes(self, layer: nn.Module) -> list[tuple[nn.Module, str, int]]:
        """Every ``(module, parameter, dim)`` of the layer indexed by the embedding channels: readers, writers
        and the pre-norm. Hidden-size pruning keeps the same channels along each."""
        norms = [(n, p, 0) for n in self.layer_norms(layer) for p in ("weight", "bias")
                 if getattr(n, p, None) is not None]
        return self.hidden_readers(layer) + self.hidden_writers(layer) + norms

    def attention_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        attn = self.attention(layer)
        return [attn.q_proj, attn.k_proj, attn.v_proj]

    def residual_writers(self, layer: nn.Module) -> list[nn.Linear]:
        """The Linear modules writing the residual stream (all kinds; MoE expert tensors: :meth:`hidden_writers`)."""
        return [mod for mod, name, _ in self.hidden_writers(layer) if isinstance(mod, nn.Linear) and name == "weight"]

    # ------------------------------------------------------------------ after width pruning
    def sync_modules(self, model: nn.Module) -> None:
        """See :meth:`sync_module_attributes` (run by width pruning after the generic bookkeeping)."""
        self.sync_module_attributes(model)

    def sync_module_attributes(self, model: nn.Module) -> None:
        """Make every module's bookkeeping match ``model.config`` and the (cut) weights, per layer kind.

        Linear/Embedding/Conv1d feature counts follow the weights; the Mamba mixers' ``num_heads``, ``head_dim``,
        ``intermediate_size`` (d_inner), ``ssm_state_size``, ``conv_dim``, ``hidden_size`` and the gated norm's
        ``group_size`` follow the config; attention ``head_dim`` / ``num_key_value_groups`` and MLP sizes too.
        """
        config = model.config
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.out_features, module.in_features = module.weight.shape
            elif isinstance(module, nn.Embedding):
                module.embedding_dim = module.weight.shape[1]
            elif isinstance(module, nn.Conv1d):
                module.in_channels = module.out_channels = module.groups = module.weight.shape[0]
        ml = self.mamba_layout(config)
        for layer in self.layers(model):
            kind, m = self.layer_kind(layer), layer.mixer
            if kind == "mamba":
                m.num_heads, m.head_dim, m.n_groups = ml.num_heads, ml.head_dim, ml.n_groups
                m.ssm_state_size, m.intermediate_size, m.conv_dim = ml.state_size, ml.d_inner, ml.conv_dim
                m.hidden_size = int(config.hidden_size)
                m.norm.group_size = ml.norm_group_size()
            elif kind == "attention":
                m.head_dim = self.head_dim(config)
                m.num_key_value_groups = int(config.num_attention_heads) // int(config.num_key_value_heads)
            elif kind == "mlp":
                m.hidden_size, m.intermediate_size = int(config.hidden_size), int(m.up_proj.weight.shape[0])
            else:
                m.experts.hidden_dim = int(config.hidden_size)
                m.experts.intermediate_dim = int(m.experts.up_proj.shape[1])
                m.gate.hidden_dim = int(config.hidden_size)
                sh = m.shared_experts
                sh.hidden_size, sh.intermediate_size = int(config.hidden_size), int(sh.up_proj.weight.shape[0])

    # ------------------------------------------------------------------ checkpoints on disk
    @staticmethod
    def checkpoint_prefix(keys: Iterable[str]) -> str:
        """The on-disk name of the decoder stack: ``"backbone"`` (what ``save_pretrained`` writes and NVIDIA's
        checkpoints use) or ``"model"``; transformers maps ``backbone.`` to ``model.`` on load."""
        keys = list(keys)
        if any(k.startswith("backbone.") for k in keys):
            return "backbone"
        if any(k.startswith("model.") for k in keys):
            return "model"
        raise ValueError("the checkpoint holds no 'backbone.*' or 'model.*' tensors: not a Nemotron-H checkpoint")

    @staticmethod
    def checkpoint_name(name: str, prefix: str = "backbone") -> str:
        """The on-disk key of the in-memory state-dict name ``name`` (``model.`` -> ``prefix.``)."""
        return prefix + name[len("model"):] if name.startswith("model.") else name

    def check_checkpoint_layout(self, config: Any, keys: Iterable[str]) -> None:
        """ValueError naming ``hybrid_override_pattern`` unless every layer's tensors on disk are of its kind.

        Looks for the signature tensor of each kind under ``{prefix}.layers.{i}.mixer.`` (Mamba ``A_log``,
        attention ``q_proj.weight``, MLP ``up_proj.weight``, MoE ``gate.weight``) and for stray layers beyond
        the pattern's length.
        """
        keys = set(keys)
        prefix = self.checkpoint_prefix(keys)
        signature = {"mamba": "A_log", "attention": "q_proj.weight", "mlp": "up_proj.weight", "moe": "gate.weight"}
        kinds = self.layer_kinds(config)
        found = []
        for i in range(len(kinds)):
            at = [k for k, s in signature.items() if f"{prefix}.layers.{i}.mixer.{s}" in keys]
            found.append(_KIND_CHAR[at[0]] if len(at) == 1 else "?")
        extra = f"{prefix}.layers.{len(kinds)}.norm.weight" in keys
        want = self.pattern(config)
        if "".join(found) != want or extra:
            raise ValueError(f"hybrid_override_pattern {want!r} (layers_block_type of config.json) does not match the "
                             f"layers on disk {''.join(found)!r}{' (+ more layers)' if extra else ''}")

    def mamba_dims_for(self, config: Any) -> Optional[MambaLayout]:
        """:meth:`mamba_layout` when the model has Mamba layers, else None."""
        return self.mamba_layout(config) if "mamba" in self.layer_kinds(config) else None
