"""How a mixture-of-experts model's tensors are laid out in its checkpoint (for the streamed paths).

transformers 5 holds the experts of a MoE layer fused in memory (``mlp.experts.gate_up_proj`` [E, 2I, H], gate rows
first, and ``mlp.experts.down_proj`` [E, H, I]) but its checkpoints -- the Hub files of Qwen3-MoE, Qwen2-MoE and
Mixtral, and whatever ``save_pretrained`` writes -- keep one 2-D tensor per expert and projection
(``mlp.experts.{e}.gate_proj.weight`` [I, H], ``up_proj`` [I, H], ``down_proj`` [H, I]; Mixtral:
``block_sparse_moe.experts.{e}.w1`` / ``w3`` / ``w2``, and ``block_sparse_moe.gate.weight`` for the router); its
loader fuses them. :class:`CheckpointView` maps the model's state-dict names onto such a checkpoint (or onto one
holding the fused tensors themselves):

* the streamed importance reads a fused tensor by assembling it from the per-expert tensors (:meth:`~CheckpointView.read`);
* the streamed pruning cuts each kept expert's own 2-D tensors (its own neurons: gate/up rows, down columns), drops
  the tensors of removed experts and renumbers the kept ones (:func:`expert_disk_cuts`), which is exactly what
  ``save_pretrained`` writes after the in-memory cut of the fused tensors.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from minitron.models import get_adapter
from minitron.models.base import ModelAdapter, MoeAdapter

__all__ = ["CheckpointView", "expert_disk_cuts", "validate_checkpoint"]


class CheckpointView:
    """The model's state-dict names as found in a checkpoint holding ``keys``.

    Attributes:
        alias: model name -> checkpoint name, for tensors saved under another name (Mixtral's router).
        stacked: fused expert tensor's model name -> per expert, its checkpoint names (``(gate, up)`` for
            ``gate_up_proj``, ``(down,)`` for ``down_proj``); empty for dense models and fused checkpoints.
        experts: fused experts module name -> (layer index, number of experts) of every per-expert-saved MoE layer.
    """

    def __init__(self, model: nn.Module, keys: Iterable[str]) -> None:
        keys = set(keys)
        self.adapter = get_adapter(model)
        self.alias: dict[str, str] = {}
        self.stacked: dict[str, list[tuple[str, ...]]] = {}
        self.experts: dict[str, tuple[int, int]] = {}
        ad = self.adapter
        if not isinstance(ad, MoeAdapter):
            # a dense or hybrid family whose checkpoints rename tensors (Nemotron-H: ``backbone.*``)
            for name in model.state_dict(keep_vars=True):
                disk = ad.checkpoint_name(name)
                if name not in keys and disk != name and disk in keys:
                    self.alias[name] = disk
            return
        names = {id(m): n for n, m in model.named_modules()}
        L = ad.dims(model.config).num_hidden_layers
        for l, layer in enumerate(list(ad.layers(model))[:L]):
            if not ad.is_moe_layer(layer):
                continue
            ex = ad.experts(layer)
            p = names[id(ex)]
            if f"{p}.gate_up_proj" in keys:
                continue  # fused on disk
            E = int(ex.gate_up_proj.shape[0])
            per = [ad.expert_checkpoint_names(p, e) for e in range(E)]
            self.stacked[f"{p}.gate_up_proj"] = [(g, u) for g, u, _ in per]
            self.stacked[f"{p}.down_proj"] = [(d,) for _, _, d in per]
            self.experts[p] = (l, E)
        for name in model.state_dict(keep_vars=True):
            if name not in self.stacked and name not in keys:
                disk = ad.checkpoint_name(name)
                if disk != name:
                    self.alias[name] = disk

    def sources(self, name: str) -> list[str]:
        """The checkpoint tensors the model tensor ``name`` is made of."""
        if name in self.stacked:
            return [n for parts in self.stacked[name] for n in parts]
        return [self.alias.get(name, name)]

    def expected_shapes(self, model: nn.Module) -> dict[str, tuple[int, ...]]:
        """Checkpoint name -> shape of every tensor the model's checkpoint holds (a tied LM head is not saved)."""
        out: dict[str, tuple[int, ...]] = {}
        seen: set[int] = set()
        for name, t in model.state_dict(keep_vars=True).items():
            if id(t) in seen:
                continue
            seen.add(id(t))
            shape = tuple(t.shape)
            if name in self.stacked:
                _, R, C = shape
                rows = R // 2 if name.endswith("gate_up_proj") else R
                for parts in self.stacked[name]:
                    for part in parts:
                        out[part] = (rows, C)
            else:
                out[self.alias.get(name, name)] = shape
        return out

    def read(self, reader: Any, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The model tensor ``name`` from ``reader`` (``get(name)``), assembled from per-expert tensors when saved
        so, cast to ``dtype`` (floating tensors) in the same pass."""
        parts = self.stacked.get(name)
        if parts is None:
            t = reader.get(self.alias.get(name, name))
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t
        first = reader.get(parts[0][0])
        R, C = first.shape
        out = torch.empty(len(parts), R * len(parts[0]), C, dtype=dtype or first.dtype)
        for e, names in enumerate(parts):
            for k, part in enumerate(names):
                out[e, k * R:(k + 1) * R].copy_(first if (e, k) == (0, 0) else reader.get(part))
        return out


def expert_disk_cuts(view: CheckpointView, plan: Any, hidden: Optional[torch.Tensor]) -> tuple[dict, dict]:
    """The cuts and renames of the per-expert checkpoint tensors for a width plan.

    Kept expert ``j`` (original ``e``) keeps its own neurons ``plan.expert_neurons[l][j]`` (rows of gate/up, columns
    of down) and the kept embedding channels (columns of gate/up, rows of down), and is renamed to index ``j``;
    removed experts' tensors are dropped.

    Returns:
        ``(cuts, renames)``: checkpoint name -> list of :class:`~minitron.compress.prune.Cut`, and checkpoint
        name -> new name (None: dropped) for every per-expert tensor.
    """
    from minitron.compress.prune import Cut

    cuts: dict[str, list] = {}
    renames: dict[str, Optional[str]] = {}
    ad = view.adapter
    for p, (l, E) in view.experts.items():
        ex, en, _ = plan.moe_at(l)
        kept = list(range(E)) if ex is None else [int(e) for e in ex]
        new_of = {e: j for j, e in enumerate(kept)}
        for e in range(E):
            old = ad.expert_checkpoint_names(p, e)
            if e not in new_of:
                renames.update({n: None for n in old})
                continue
            j = new_of[e]
            for n, k in zip(old, ad.expert_checkpoint_names(p, j)):
                if n != k:
                    renames[n] = k
            gate, up, down = old
            for n, neuron_dim, hidden_dim in ((gate, 0, 1), (up, 0, 1), (down, 1, 0)):
                c = ([Cut(en[j], neuron_dim)] if en is not None else []) + (
                    [Cut(hidden, hidden_dim)] if hidden is not None else [])
                if c:
                    cuts[n] = c
    return cuts, renames


def validate_checkpoint(ckpt: Any) -> Any:
    """:meth:`minitron.io.shards.ShardedCheckpoint.validate`, also for MoE checkpoints saved with per-expert
    tensors (the transformers layout, which ``validate`` compares against the fused in-memory names); returns
    ``ckpt``."""
    from minitron.io.checkpoint import CheckpointError

    config = ckpt.config
    try:
        adapter = get_adapter(config)
    except (ValueError, TypeError):
        return ckpt.validate()  # raises the family error, naming config.json
    renames = type(adapter).checkpoint_name is not ModelAdapter.checkpoint_name
    if not isinstance(adapter, MoeAdapter) and not renames:
        return ckpt.validate()
    from transformers import AutoModelForCausalLM

    keys = ckpt.keys()  # reads every header: missing / truncated / corrupt files are named
    check_layout = getattr(adapter, "check_checkpoint_layout", None)
    if check_layout is not None:  # hybrid families: the layer pattern of config.json against the tensors on disk
        try:
            check_layout(config, keys)
        except ValueError as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = CheckpointView(skeleton, keys).expected_shapes(skeleton)
    cfg = str(ckpt.path / "config.json")
    for name in keys:
        if name not in expected:
            raise CheckpointError(f"weight file {str(ckpt.file_of(name))!r} holds tensor {name}, which the model "
                                  f"described by {cfg!r} does not have")
        if tuple(ckpt.shape(name)) != expected[name]:
            raise CheckpointError(f"weight file {str(ckpt.file_of(name))!r}: tensor {name} has shape "
                                  f"{tuple(ckpt.shape(name))}, but {cfg!r} describes {expected[name]}")
    missing = [k for k in expected if k not in set(keys)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} lacks tensor(s) {', '.join(missing[:3])}{more} that "
                              f"{cfg!r} describes")
    return ckpt
