"""The model-adapter base class: where the prunable axes of a Hugging Face decoder-only model live.

An adapter knows nothing about importance or pruning algorithms. It only answers *where* things are:

* the decoder-layer list, the token embedding, the final norm and the LM head;
* per layer: the attention projections, how query heads / key-value heads map to their rows
  (``q``/``k``/``v``) and columns (``o``), the MLP projections and how MLP neurons map to their rows
  (``gate``/``up``) and columns (``down``), the two residual-stream norms;
* the config fields that describe those axes, and family rules a pruned config must satisfy.

The base class describes the Llama layout (separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and
``gate_proj``/``up_proj``/``down_proj``, ``input_layernorm``/``post_attention_layernorm``), which Llama,
Mistral, Qwen2 and Qwen3 share. A family with another layout (Phi-3's fused ``qkv_proj`` and
``gate_up_proj``) overrides the few methods that differ. Adding a family is one small file that
subclasses :class:`ModelAdapter` and is listed in :mod:`minitron.models`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

from torch import Tensor, nn


@dataclass(frozen=True)
class Dims:
    """The sizes of every prunable axis of a model, read from its config.

    Attributes:
        hidden_size: embedding channels (the residual stream width).
        intermediate_size: MLP neurons per layer.
        num_attention_heads: query heads per layer.
        num_key_value_heads: key/value heads (GQA groups) per layer.
        head_dim: size of one head (kept by pruning).
        num_hidden_layers: decoder layers.
        vocab_size: vocabulary size (never pruned).
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    vocab_size: int

    @property
    def heads_per_group(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True)
class RowSpan:
    """Where one axis lives among the output rows of a linear layer.

    ``linear.weight[start : start + units * unit_size]`` (and the same rows of ``linear.bias`` when it
    has one) hold the axis, unit ``u`` owning rows ``start + u * unit_size ... + unit_size - 1``.
    Fused projections (Phi-3 ``qkv_proj``) hold several spans in one linear.
    """

    linear: nn.Linear
    start: int
    units: int
    unit_size: int


@dataclass(frozen=True)
class MoeDims:
    """The mixture-of-experts sizes of a model, read from its config (canonical names, whatever the family calls
    them).

    Attributes:
        num_experts: routed experts per MoE layer (router rows).
        num_experts_per_tok: experts each token is routed to (top-k).
        moe_intermediate_size: MLP width of every routed expert (the fused format holds one width for all).
        shared_expert_intermediate_size: MLP width of the shared expert (Qwen2-MoE), None without one.
        moe_layers: per decoder layer, True where the layer's MLP is the sparse MoE block (False: a dense MLP of
            ``intermediate_size``).
    """

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: Optional[int]
    moe_layers: tuple[bool, ...]


#: The MoE width targets (canonical names; :attr:`MoeAdapter.config_fields` maps them to a family's fields).
MOE_WIDTH_FIELDS = ("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size")


class ModelAdapter:
    """Describes where the prunable axes of one Hugging Face decoder-only family live.

    Subclasses set :attr:`model_type` and override what differs from the Llama layout. Instances are
    stateless; every method takes the model, a decoder layer or a config.
    """

    #: ``config.model_type`` of the family.
    model_type: ClassVar[str] = ""
    #: Config fields holding one entry per decoder layer, cut to the kept layers by depth pruning.
    per_layer_config_fields: ClassVar[tuple[str, ...]] = ("layer_types",)

    # ------------------------------------------------------------------ config
    def dims(self, config: Any) -> Dims:
        """Read every prunable size from ``config``."""
        heads = int(config.num_attention_heads)
        kv = getattr(config, "num_key_value_heads", None)
        kv = heads if kv is None else int(kv)
        return Dims(
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=self.head_dim(config),
            num_hidden_layers=int(config.num_hidden_layers),
            vocab_size=int(config.vocab_size),
        )

    def head_dim(self, config: Any) -> int:
        """Size of one attention head: ``config.head_dim`` when set, else hidden_size // heads."""
        hd = getattr(config, "head_dim", None)
        return int(hd) if hd else int(config.hidden_size) // int(config.num_attention_heads)

    def fingerprint(self, config: Any) -> dict[str, Any]:
        """The config facts importance scores depend on (used to refuse scores of another model)."""
        d = self.dims(config)
        return {
            "model_type": self.model_type,
            "hidden_size": d.hidden_size,
            "intermediate_size": d.intermediate_size,
            "num_attention_heads": d.num_attention_heads,
            "num_key_value_heads": d.num_key_value_heads,
            "head_dim": d.head_dim,
            "num_hidden_layers": d.num_hidden_layers,
            "vocab_size": d.vocab_size,
            "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        }

    def pruned_config(self, config: Any, **sizes: int) -> Any:
        """A deep copy of ``config`` with the given width sizes set (``head_dim`` written explicitly).

        Args:
            config: the model's config (not modified).
            **sizes: any of hidden_size, intermediate_size, num_attention_heads, num_key_value_heads.
        Returns:
            A new config object of the same class.
        """
        head_dim = self.head_dim(config)
        new = copy.deepcopy(config)
        for name, value in sizes.items():
            setattr(new, name, int(value))
        new.head_dim = head_dim
        return new

    def check_config(self, config: Any) -> None:
        """Family rules a (pruned) config must satisfy to be saved and loaded again.

        The base class runs the config's own validators (``config.validate()`` in transformers 5).
        Subclasses add rules with clearer messages first. Raises ``ValueError``.
        """
        validate = getattr(config, "validate", None)
        if callable(validate):
            try:
                validate()
            except Exception as exc:  # transformers raises its own validation error types
                raise ValueError(
                    f"the pruned {self.model_type} config would be rejected by transformers: {exc}"
                ) from exc

    def moe_dims(self, config: Any) -> Optional[MoeDims]:
        """The mixture-of-experts sizes of ``config``; None for a dense family (the default)."""
        return None

    def is_moe_layer(self, layer: nn.Module) -> bool:
        """Whether this decoder layer's MLP is a sparse mixture-of-experts block (never, for a dense family)."""
        return False

    def sync_modules(self, model: nn.Module) -> None:
        """Make family-specific module bookkeeping match the (pruned) config and weights; default: nothing."""

    # ------------------------------------------------------------------ layer kinds (hybrid families)
    def has_attention(self, layer: nn.Module) -> bool:
        """Whether this decoder layer has attention heads to score and prune (every layer, by default; a hybrid
        family such as Nemotron-H answers per layer kind)."""
        return True

    def has_mlp(self, layer: nn.Module) -> bool:
        """Whether this decoder layer has a (dense or MoE) MLP block (every layer, by default)."""
        return True

    def is_mamba_layer(self, layer: nn.Module) -> bool:
        """Whether this decoder layer is a Mamba-2 mixer (never, by default; see
        :mod:`minitron.compress.mamba`)."""
        return False

    def extra_width_sizes(self, config: Any) -> dict[str, int]:
        """Family-specific width axes beyond the dense and MoE ones, ``{name: current size}`` (default: none;
        Nemotron-H: ``mamba_num_heads``, ``mamba_head_dim``). Width targets of these names are accepted, checked
        to lie in [1, current] and written into the config under the same names."""
        return {}

    def checkpoint_name(self, name: str) -> str:
        """The name a state-dict tensor has in the family's saved checkpoints (default: the same)."""
        return name

    def width_transforms(self, config_before: Any, config_after: Any) -> dict[str, Callable[[Tensor], Tensor]]:
        """Functions applied to tensors after width pruning has cut them (default: none).

        Width pruning (in memory, :func:`minitron.compress.prune.prune_width`, and shard-streamed,
        :func:`minitron.compress.stream_prune.prune_checkpoint_streaming`) calls this once with the config before
        and after the width cut, then replaces each named tensor ``t`` (after its cuts, in the width-pruned shape,
        before any depth renaming) by ``fn(t)``. A family whose forward depends on a size in a way slicing alone
        does not keep (Gemma-3 scales the embedding by ``sqrt(hidden_size)``) compensates here.

        Args:
            config_before: the config before width pruning (not modified).
            config_after: the config after width pruning (not modified).
        Returns:
            ``{state-dict name: fn}``; ``fn`` takes and returns a tensor of the same shape and dtype and must not
            modify its input. A tied LM head is not a separate tensor: name the embedding.
        """
        return {}

    # ------------------------------------------------------------------ model-level modules
    def check_model(self, model: nn.Module) -> None:
        """Raise ``TypeError`` unless ``model`` is a causal-LM of this family with the expected layout."""
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        missing = [n for n in ("lm_head",) if not hasattr(model, n)]
        base = getattr(model, "model", None)
        if base is None:
            missing.append("model")
        else:
            missing += [f"model.{n}" for n in ("embed_tokens", "layers", "norm") if not hasattr(base, n)]
        if missing:
            raise TypeError(
                f"model must be a {self.model_type} *ForCausalLM model (AutoModelForCausalLM); "
                f"{type(model).__name__} has no {', '.join(missing)}"
            )

    def base_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack without the LM head (``model.model``)."""
        return model.model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers."""
        return self.base_model(model).layers

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        """Replace the decoder-layer list."""
        self.base_model(model).layers = layers

    def embedding(self, model: nn.Module) -> nn.Embedding:
        """The token embedding, weight [vocab_size, hidden_size]."""
        return self.base_model(model).embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm after the last decoder layer, weight [hidden_size]."""
        return self.base_model(model).norm

    def lm_head(self, model: nn.Module) -> nn.Linear:
        """The output projection, weight [vocab_size, hidden_size] (may be tied to the embedding)."""
        return model.lm_head

    # ------------------------------------------------------------------ per-layer modules
    def attention(self, layer: nn.Module) -> nn.Module:
        """The self-attention module of a decoder layer."""
        return layer.self_attn

    def mlp(self, layer: nn.Module) -> nn.Module:
        """The MLP module of a decoder layer."""
        return layer.mlp

    def layer_norms(self, layer: nn.Module) -> list[nn.Module]:
        """The residual-stream norms of a layer (weights [hidden_size]), in forward order."""
        return [layer.input_layernorm, layer.post_attention_layernorm]

    def o_proj(self, layer: nn.Module) -> nn.Linear:
        """Attention output projection: input columns are [heads x head_dim], head-major."""
        return self.attention(layer).o_proj

    def down_proj(self, layer: nn.Module) -> nn.Linear:
        """MLP output projection: input columns are the MLP neurons."""
        return self.mlp(layer).down_proj

    def query_rows(self, layer: nn.Module, dims: Dims) -> RowSpan:
        """Rows producing the query heads (unit = one head, head_dim rows)."""
        return RowSpan(self.attention(layer).q_proj, 0, dims.num_attention_heads, dims.head_dim)

    def key_rows(self, layer: nn.Module, dims: Dims) -> RowSpan:
        """Rows producing the key heads (unit = one KV head, head_dim rows)."""
        return RowSpan(self.attention(layer).k_proj, 0, dims.num_key_value_heads, dims.head_dim)

    def value_rows(self, layer: nn.Module, dims: Dims) -> RowSpan:
        """Rows producing the value heads (unit = one KV head, head_dim rows)."""
        return RowSpan(self.attention(layer).v_proj, 0, dims.num_key_value_heads, dims.head_dim)

    def gate_rows(self, layer: nn.Module, dims: Dims) -> RowSpan:
        """Rows producing the MLP gate activations (unit = one neuron)."""
        return RowSpan(self.mlp(layer).gate_proj, 0, dims.intermediate_size, 1)

    def up_rows(self, layer: nn.Module, dims: Dims) -> RowSpan:
        """Rows producing the MLP up activations (unit = one neuron)."""
        return RowSpan(self.mlp(layer).up_proj, 0, dims.intermediate_size, 1)

    def attention_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        """Linears reading the normed residual stream in attention (columns = hidden channels)."""
        attn = self.attention(layer)
        return [attn.q_proj, attn.k_proj, attn.v_proj]

    def mlp_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        """Linears reading the normed residual stream in the MLP (columns = hidden channels)."""
        mlp = self.mlp(layer)
        return [mlp.gate_proj, mlp.up_proj]

    def mlp_row_spans(self, layer: nn.Module, dims: Dims) -> list[RowSpan]:
        """Rows producing the MLP neurons' activations (gate and up; a non-gated MLP has up only)."""
        return [self.gate_rows(layer, dims), self.up_rows(layer, dims)]

    def hidden_axes(self, layer: nn.Module) -> list[tuple[nn.Module, str, int]]:
        """Every ``(module, parameter name, dim)`` of a decoder layer indexed by the embedding channels (a missing
        parameter, e.g. an absent bias, is skipped by the caller): the attention/MLP inputs (dim 1), the residual
        writers (dim 0, weight and bias) and the layer norms (dim 0). Fused MoE experts are cut separately."""
        readers = (self.attention_inputs(layer) if self.has_attention(layer) else []) + (
            self.mlp_inputs(layer) if self.has_mlp(layer) else [])
        out: list[tuple[nn.Module, str, int]] = [(m, "weight", 1) for m in readers]
        for m in self.residual_writers(layer) + self.layer_norms(layer):
            out += [(m, "weight", 0), (m, "bias", 0)]
        return out

    def residual_writers(self, layer: nn.Module) -> list[nn.Linear]:
        """Linears writing the residual stream (rows = hidden channels)."""
        return [self.o_proj(layer), self.down_proj(layer)]

    # ------------------------------------------------------------------ depth
    def cut_per_layer_config(self, config: Any, kept: list[int]) -> None:
        """Cut per-layer config lists to the kept layer indices (in place on ``config``).

        Cuts every field of :attr:`per_layer_config_fields` that holds one entry per layer, and keeps
        ``max_window_layers`` (layers below it use full attention) consistent: it becomes the number of
        kept layers whose original index was below it.
        """
        num_layers = int(config.num_hidden_layers)
        for name in self.per_layer_config_fields:
            value = getattr(config, name, None)
            if isinstance(value, (list, tuple)) and len(value) == num_layers:
                setattr(config, name, type(value)(value[i] for i in kept))
        mwl: Optional[int] = getattr(config, "max_window_layers", None)
        if isinstance(mwl, int):
            config.max_window_layers = sum(1 for i in kept if i < mwl)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_type={self.model_type!r})"


class MoeAdapter(ModelAdapter):
    """A decoder family whose MLPs are (some or all) sparse mixture-of-experts blocks in transformers' fused format.

    A MoE layer's ``mlp`` holds ``experts`` (``gate_up_proj`` [E, 2*I, H], gate rows first then up rows, and
    ``down_proj`` [E, H, I]), the router ``gate`` (``weight`` [E, H]) and, in some families, a ``shared_expert``
    (a dense gated MLP) with its ``shared_expert_gate`` (Linear H -> 1). Other layers (``mlp_only_layers``,
    ``decoder_sparse_step``) hold a dense MLP of ``intermediate_size``. Subclasses set :attr:`config_fields`.
    """

    #: canonical MoE size -> the family's config field (None: the family has no such axis).
    config_fields: ClassVar[dict[str, Optional[str]]] = {
        "num_experts": "num_experts",
        "moe_intermediate_size": "moe_intermediate_size",
        "shared_expert_intermediate_size": None,
    }
    #: whether the family can hold dense-MLP layers (``mlp_only_layers`` / ``decoder_sparse_step``).
    dense_layers_possible: ClassVar[bool] = True

    # ------------------------------------------------------------------ config
    def moe_layer_flags(self, config: Any) -> tuple[bool, ...]:
        """Per layer, whether it is a MoE layer: transformers' rule ``i not in mlp_only_layers and num_experts > 0
        and (i + 1) % decoder_sparse_step == 0`` (every layer when the family has neither field)."""
        L = int(config.num_hidden_layers)
        if not self.dense_layers_possible:
            return (True,) * L
        only = set(getattr(config, "mlp_only_layers", None) or [])
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        e = int(getattr(config, self.config_fields["num_experts"]))
        return tuple(i not in only and e > 0 and (i + 1) % step == 0 for i in range(L))

    def moe_dims(self, config: Any) -> MoeDims:
        f = self.config_fields
        shared = f.get("shared_expert_intermediate_size")
        return MoeDims(
            num_experts=int(getattr(config, f["num_experts"])),
            num_experts_per_tok=int(config.num_experts_per_tok),
            moe_intermediate_size=int(getattr(config, f["moe_intermediate_size"])),
            shared_expert_intermediate_size=None if shared is None else int(getattr(config, shared)),
            moe_layers=self.moe_layer_flags(config),
        )

    def fingerprint(self, config: Any) -> dict[str, Any]:
        fp = super().fingerprint(config)
        m = self.moe_dims(config)
        fp.update(num_experts=m.num_experts, num_experts_per_tok=m.num_experts_per_tok,
                  moe_intermediate_size=m.moe_intermediate_size,
                  shared_expert_intermediate_size=m.shared_expert_intermediate_size,
                  moe_layers=[i for i, f in enumerate(m.moe_layers) if f])
        return fp

    def set_moe_sizes(self, config: Any, **sizes: int) -> None:
        """Write canonical MoE sizes (any of :data:`MOE_WIDTH_FIELDS`) into ``config``'s own fields, in place."""
        for name, value in sizes.items():
            field = self.config_fields.get(name)
            if field is None:
                raise ValueError(f"{name}: a {self.model_type} model has no such axis")
            setattr(config, field, int(value))

    def pruned_config(self, config: Any, **sizes: int) -> Any:
        moe = {k: sizes.pop(k) for k in list(sizes) if k in MOE_WIDTH_FIELDS}
        new = super().pruned_config(config, **sizes)
        self.set_moe_sizes(new, **moe)
        return new

    def check_config(self, config: Any) -> None:
        m = self.moe_dims(config)
        if m.num_experts < m.num_experts_per_tok:
            raise ValueError(f"num_experts={m.num_experts} is below num_experts_per_tok={m.num_experts_per_tok}: "
                             "every token is routed to num_experts_per_tok distinct experts")
        super().check_config(config)

    def cut_per_layer_config(self, config: Any, kept: list[int]) -> None:
        """Also keep each kept layer's kind (MoE or dense): ``decoder_sparse_step`` becomes 1 and
        ``mlp_only_layers`` the new indices of the kept dense layers (transformers decides a layer's kind from its
        index at construction)."""
        flags = self.moe_layer_flags(config)
        super().cut_per_layer_config(config, kept)
        if self.dense_layers_possible:
            config.decoder_sparse_step = 1
            config.mlp_only_layers = [new for new, old in enumerate(kept) if not flags[old]]

    # ------------------------------------------------------------------ checkpoint names
    def checkpoint_name(self, name: str) -> str:
        """The name a (non-expert) state-dict tensor has in the family's saved checkpoints (default: the same)."""
        return name

    def expert_checkpoint_names(self, experts_name: str, e: int) -> tuple[str, str, str]:
        """The saved names of expert ``e``'s gate, up and down weights ([I, H], [I, H], [H, I]).

        transformers 5 fuses the experts in memory (``experts.gate_up_proj`` / ``experts.down_proj``) but reads and
        writes checkpoints (Hub files and ``save_pretrained``) with one 2-D tensor per expert and projection.

        Args:
            experts_name: the state-dict prefix of the fused experts module (``model.layers.3.mlp.experts``).
            e: the expert index.
        """
        p = self.checkpoint_name(experts_name)
        return f"{p}.{e}.gate_proj.weight", f"{p}.{e}.up_proj.weight", f"{p}.{e}.down_proj.weight"

    # ------------------------------------------------------------------ per-layer modules
    def is_moe_layer(self, layer: nn.Module) -> bool:
        return hasattr(self.mlp(layer), "experts")

    def experts(self, layer: nn.Module) -> nn.Module:
        """The fused experts of a MoE layer: ``gate_up_proj`` [E, 2*I, H] (gate rows, then up rows),
        ``down_proj`` [E, H, I]."""
        return self.mlp(layer).experts

    def router(self, layer: nn.Module) -> nn.Module:
        """The router of a MoE layer: ``weight`` [E, H] (and a per-expert ``bias`` / ``e_score_correction_bias``
        in families that have one)."""
        return self.mlp(layer).gate

    def shared_expert(self, layer: nn.Module) -> Optional[nn.Module]:
        """The shared expert (a dense gated MLP) of a MoE layer, or None."""
        return getattr(self.mlp(layer), "shared_expert", None)

    def shared_expert_gate(self, layer: nn.Module) -> Optional[nn.Linear]:
        """The shared expert's sigmoid gate (Linear H -> 1), or None."""
        return getattr(self.mlp(layer), "shared_expert_gate", None)

    def mlp_inputs(self, layer: nn.Module) -> list[nn.Module]:
        """Dense layers: gate/up; MoE layers: the router, and the shared expert's gate/up and gate (columns =
        hidden channels; the fused experts are cut separately)."""
        if not self.is_moe_layer(layer):
            return super().mlp_inputs(layer)
        out: list[nn.Module] = [self.router(layer)]
        shared = self.shared_expert(layer)
        if shared is not None:
            out += [shared.gate_proj, shared.up_proj]
        gate = self.shared_expert_gate(layer)
        if gate is not None:
            out.append(gate)
        return out

    def residual_writers(self, layer: nn.Module) -> list[nn.Linear]:
        """Dense layers: o_proj and down_proj; MoE layers: o_proj and the shared expert's down_proj (the fused
        experts' down_proj is cut separately)."""
        if not self.is_moe_layer(layer):
            return super().residual_writers(layer)
        shared = self.shared_expert(layer)
        return [self.o_proj(layer)] + ([shared.down_proj] if shared is not None else [])

    def sync_modules(self, model: nn.Module) -> None:
        """Experts / router / shared-expert / causal-LM bookkeeping (``num_experts``, ``intermediate_dim``,
        ``hidden_dim``, ``intermediate_size``) from the config."""
        config = model.config
        m = self.moe_dims(config)
        hidden = int(config.hidden_size)
        if isinstance(getattr(model, "num_experts", None), int):
            model.num_experts = m.num_experts
        for layer in self.layers(model):
            if not self.is_moe_layer(layer):
                mlp = self.mlp(layer)
                if isinstance(getattr(mlp, "intermediate_size", None), int):
                    mlp.intermediate_size = int(mlp.down_proj.weight.shape[1])
                continue
            experts, router = self.experts(layer), self.router(layer)
            experts.num_experts, experts.hidden_dim = m.num_experts, hidden
            experts.intermediate_dim = m.moe_intermediate_size
            router.num_experts, router.hidden_dim = m.num_experts, hidden
            shared = self.shared_expert(layer)
            if shared is not None:
                shared.intermediate_size = int(shared.down_proj.weight.shape[1])
                shared.hidden_size = hidden

