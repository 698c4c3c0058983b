"""Activation-based importance of heads, MLP neurons, embedding channels and layers (Minitron).

:func:`estimate_importance` runs a model over calibration batches with forward hooks that stream the
activations into :class:`minitron.ops.ImportanceAccumulator` / :class:`minitron.ops.BlockInfluence`
(fused, masked, fp32 accumulation), and optionally measures the LM-loss increase when each layer is
skipped. Where each score comes from:

* **heads** ``[num_layers, num_attention_heads]``: the input of ``o_proj`` (the concatenated per-head
  attention outputs, head-major), one unit per head of ``head_dim`` activations (``group_size=head_dim``).
* **kv_groups** ``[num_layers, num_key_value_heads]``: the *sum* of the head scores of the query heads
  that share that key/value head (query head ``h`` uses KV head ``h // (heads / kv_heads)``).
* **neurons** ``[num_layers, intermediate_size]``: the input of ``down_proj`` (``act(gate) * up``).
* **channels** ``[hidden_size]``: the outputs of every residual-stream norm (``input_layernorm`` and
  ``post_attention_layernorm`` of each layer, and the final norm), each aggregated on its own, then
  summed over the norms.
* **block_influence** ``[num_layers]``: ``1 - cos(h_in, h_out)`` of each decoder layer (ShortGPT).
* **lm_loss_drop** ``[num_layers]``: LM loss (mean token NLL, fp32) on the calibration batches with the
  layer replaced by the identity, minus the loss of the full model.

Padding (``attention_mask == 0``) is masked out of every score, and out of the LM loss.

Scores are saved as ``importance.safetensors`` + ``importance.json`` and carry a config fingerprint so
that scores of another model are refused (:meth:`ImportanceScores.check_compatible`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from minitron.io.files import current_umask
from minitron.models import get_adapter
from minitron.models.base import ModelAdapter

log = logging.getLogger(__name__)

__all__ = ["ImportanceScores", "estimate_importance", "LAYER_METRICS", "SCORES_FILE", "META_FILE", "shape_signature",
           "validate_options"]

SCORES_FILE = "importance.safetensors"
META_FILE = "importance.json"
LAYER_METRICS = ("block_influence", "lm_loss")
_TENSOR_FIELDS = ("heads", "kv_groups", "neurons", "channels", "block_influence", "lm_loss_drop", "experts",
                  "expert_frequency", "expert_neurons", "shared_neurons", "mamba_heads", "mamba_channels")
#: Tensor fields that may be absent (None): the LM-loss drop, the expert scores (mixture-of-experts models only)
#: and the Mamba scores (hybrid Mamba models only).
_OPTIONAL_FIELDS = ("lm_loss_drop", "experts", "expert_frequency", "expert_neurons", "shared_neurons",
                    "mamba_heads", "mamba_channels")
_NDIM = {"heads": 2, "kv_groups": 2, "neurons": 2, "channels": 1, "block_influence": 1, "lm_loss_drop": 1,
         "experts": 2, "expert_frequency": 2, "expert_neurons": 3, "shared_neurons": 2, "mamba_heads": 2,
         "mamba_channels": 3}
_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- scores
@dataclass
class ImportanceScores:
    """Importance of every prunable unit of one model (all tensors fp32, on CPU).

    Attributes:
        heads: [num_layers, num_attention_heads] per query head (input of o_proj, per head).
        kv_groups: [num_layers, num_key_value_heads] sum of the head scores of each KV group's query heads.
        neurons: [num_layers, intermediate_size] per MLP neuron (input of down_proj).
        channels: [hidden_size] per embedding channel (norm outputs, summed over all norms).
        block_influence: [num_layers] 1 - cos(layer input, layer output), token-averaged (NaN when
            not measured).
        lm_loss_drop: [num_layers] LM-loss increase when that single layer is skipped, or None when
            not measured.
        meta: model_type, ``config_fingerprint`` (dict of the config sizes), seq_agg, batch_agg,
            num_samples, num_tokens, num_batches, base_lm_loss, layer_metrics.
        experts: [num_layers, num_experts] per routed expert of each MoE layer: the L2 norm, over every calibration
            token routed to it, of its router-weighted output ``w * expert(x)`` (0 in dense layers); None for a
            dense model. See :mod:`minitron.compress.moe_importance`.
        expert_frequency: [num_layers, num_experts] fraction of the calibration tokens routed to each expert
            (sums to num_experts_per_tok over the experts of a MoE layer).
        expert_neurons: [num_layers, num_experts, moe_intermediate_size] per neuron of each expert: the magnitude of
            ``act(gate) * up`` over only the tokens routed to that expert, aggregated like ``neurons``.
        shared_neurons: [num_layers, shared_expert_intermediate_size] per shared-expert neuron (input of its
            down_proj, like ``neurons``); None without shared experts.
        mamba_heads: [num_layers, mamba_num_heads] per Mamba head of each Mamba layer (hybrid models): the input of
            the mixer's ``out_proj`` per head (``group_size = mamba_head_dim``), 0 on other layers; None otherwise.
        mamba_channels: [num_layers, mamba_num_heads, mamba_head_dim] per channel of that input (head-dim pruning
            aggregates it over the kept heads). See :mod:`minitron.compress.mamba`.
        Attention layers only have head scores and MLP layers only neuron scores in a hybrid model (0 elsewhere).
    """

    heads: torch.Tensor
    kv_groups: torch.Tensor
    neurons: torch.Tensor
    channels: torch.Tensor
    block_influence: torch.Tensor
    lm_loss_drop: Optional[torch.Tensor] = None
    meta: dict = field(default_factory=dict)
    experts: Optional[torch.Tensor] = None
    expert_frequency: Optional[torch.Tensor] = None
    expert_neurons: Optional[torch.Tensor] = None
    shared_neurons: Optional[torch.Tensor] = None
    mamba_heads: Optional[torch.Tensor] = None
    mamba_channels: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"ImportanceScores.{name} must be a torch.Tensor, got {type(value).__name__}")
        if not isinstance(self.meta, dict):
            raise TypeError(f"ImportanceScores.meta must be a dict, got {type(self.meta).__name__}")
        num_layers = self.heads.shape[0] if self.heads.dim() == 2 else -1
        for name, ndim in _NDIM.items():
            value = getattr(self, name)
            if value is None:
                continue
            if value.dim() != ndim:
                raise ValueError(f"ImportanceScores.{name} must be {ndim}-D, got shape {tuple(value.shape)}")
            if name != "channels" and value.shape[0] != num_layers:
                raise ValueError(
                    f"ImportanceScores.{name} has {value.shape[0]} layers, heads has {num_layers}"
                )

    # -------------------------------------------------------------- properties
    @property
    def num_layers(self) -> int:
        """Number of decoder layers the scores describe."""
        return int(self.heads.shape[0])

    @property
    def fingerprint(self) -> dict:
        """The config fingerprint of the model the scores were computed on."""
        return dict(self.meta.get("config_fingerprint", {}))

    def layer_scores(self, metric: str) -> torch.Tensor:
        """[num_layers] fp32 scores of ``metric`` ("lm_loss" or "block_influence"); higher = more important."""
        if metric == "block_influence":
            return self.block_influence
        if metric == "lm_loss":
            if self.lm_loss_drop is None:
                raise ValueError(
                    "these importance scores have no lm_loss_drop (estimated without the 'lm_loss' layer "
                    "metric); use metric='block_influence' or re-estimate with layer_metrics including 'lm_loss'"
                )
            return self.lm_loss_drop
        raise ValueError(f"metric must be 'lm_loss' or 'block_influence', got {metric!r}")

    # -------------------------------------------------------------- compatibility
    def check_compatible(self, config: Any, *, fields: Optional[Sequence[str]] = None) -> None:
        """Raise ``ValueError`` if these scores were computed on a model with another config.

        Args:
            config: a transformers config (or a model; its ``.config`` is used).
            fields: fingerprint fields to compare (default: all). Depth pruning after width pruning
                compares only ``("model_type", "num_hidden_layers")``.
        """
        config = getattr(config, "config", config)
        adapter = get_adapter(config)
        mine = self.fingerprint
        if not mine:
            raise ValueError("these importance scores carry no config fingerprint (meta['config_fingerprint'])")
        theirs = adapter.fingerprint(config)
        names = tuple(fields) if fields is not None else tuple(sorted(set(mine) | set(theirs)))
        diffs = [f"{k}: scores {mine.get(k)!r} vs model {theirs.get(k)!r}" for k in names if mine.get(k) != theirs.get(k)]
        if diffs:
            raise ValueError(
                "importance scores were computed on a different model (" + "; ".join(diffs) + ")"
            )

    def check_model(self, model: nn.Module, *, source: str = "importance scores") -> None:
        """Raise ``ValueError`` unless these scores were computed on a model with exactly ``model``'s tensors.

        Compares the config fingerprint and the shape signature (every parameter name and shape; see
        :func:`shape_signature`). Scores saved before signatures existed are checked by fingerprint only.
        """
        self.check_compatible(model.config)
        mine = self.meta.get("shape_signature")
        if mine is None:
            log.warning("%s carry no shape signature (saved by an older minitron); checked by config only", source)
            return
        theirs = shape_signature(model)
        if mine != theirs:
            raise ValueError(
                f"{source} were computed on a different model: same config sizes but other tensors or shapes "
                f"(shape signature {mine[:12]} vs the model's {theirs[:12]}); re-run `minitron importance` on this model"
            )

    def select_layers(self, kept: Sequence[int]) -> "ImportanceScores":
        """Scores restricted to the kept layers (after depth pruning), with the fingerprint updated.

        Args:
            kept: original indices of the kept layers, increasing.
        """
        idx = _check_layer_list(kept, self.num_layers, "kept")
        t = torch.tensor(idx, dtype=torch.long)
        meta = json.loads(json.dumps(self.meta))
        fp = meta.setdefault("config_fingerprint", {})
        fp["num_hidden_layers"] = len(idx)
        if "moe_layers" in fp:
            pos = {old: new for new, old in enumerate(idx)}
            fp["moe_layers"] = [pos[i] for i in fp["moe_layers"] if i in pos]
        per_layer = {n: None if getattr(self, n) is None else getattr(self, n)[t].clone()
                     for n in _TENSOR_FIELDS if n != "channels"}
        return ImportanceScores(channels=self.channels.clone(), meta=meta, **per_layer)

    # -------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write ``importance.safetensors`` and ``importance.json`` into ``directory`` (created if needed).

        Each file is written to a temporary name and renamed into place, the JSON last; the safetensors
        metadata repeats the JSON so a mismatched pair is detected on load. Refuses to replace existing
        score files unless ``overwrite``.

        Under ``torch.distributed`` (default group of more than one rank) this is a collective: only rank 0
        writes, the outcome is broadcast, and every rank returns after the files are in place (or raises
        when rank 0 failed to write them).
        """
        from minitron.compress.distributed import collective, group_for, rank_info

        info = rank_info()
        if not info.distributed:
            self._save_local(directory, overwrite=overwrite)
            return
        import torch.distributed as dist

        error: Optional[BaseException] = None
        if info.rank == 0:
            try:
                self._save_local(directory, overwrite=overwrite)
            except Exception as exc:  # reported to every rank below, then re-raised here
                error = exc
        box: list[Any] = [None if error is None else f"{type(error).__name__}: {error}"]
        group = group_for(torch.device("cpu"))
        collective("broadcast of the save result from rank 0",
                   lambda: dist.broadcast_object_list(box, src=0, group=group))
        if error is not None:
            raise error
        if box[0] is not None:
            raise RuntimeError(f"rank 0 failed to save the importance scores to {str(directory)!r}: {box[0]}")

    def _save_local(self, directory: str | os.PathLike, *, overwrite: bool) -> None:
        from safetensors.torch import save_file

        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, got {type(directory).__name__}")
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise ValueError(f"directory {str(d)!r} exists and is not a directory")
        if not overwrite:
            existing = [n for n in (SCORES_FILE, META_FILE) if (d / n).exists()]
            if existing:
                raise FileExistsError(
                    f"{d} already holds importance scores ({', '.join(existing)}); pass overwrite=True to replace them"
                )
        d.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: getattr(self, name).detach().to("cpu", torch.float32).contiguous()
            for name in _TENSOR_FIELDS
            if getattr(self, name) is not None
        }
        meta_json = json.dumps({"format_version": _FORMAT_VERSION, **self.meta}, indent=2, sort_keys=True, default=str)
        _atomic_write(d / SCORES_FILE, lambda p: save_file(tensors, str(p), metadata={"meta": meta_json}))
        _atomic_write(d / META_FILE, lambda p: Path(p).write_text(meta_json + "\n"))
        log.info("saved importance scores to %s", d)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ImportanceScores":
        """Read scores written by :meth:`save`."""
        from safetensors import safe_open

        d = Path(directory)
        missing = [n for n in (SCORES_FILE, META_FILE) if not (d / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{d} holds no importance scores (missing {', '.join(missing)})")
        try:
            meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"importance file {str(d / META_FILE)!r} is corrupt or truncated (not valid JSON: {e})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"importance file {str(d / META_FILE)!r} is corrupt (not a JSON object)")
        try:
            with safe_open(str(d / SCORES_FILE), framework="pt") as f:
                inner = json.loads((f.metadata() or {}).get("meta", "null"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # SafetensorError, OSError, JSONDecodeError of the embedded metadata
            raise ValueError(
                f"importance file {str(d / SCORES_FILE)!r} is corrupt or truncated ({type(e).__name__}: {e})"
            ) from None
        if inner is not None and inner != meta:
            raise ValueError(f"{d}: {SCORES_FILE} and {META_FILE} come from different runs")
        missing_t = [n for n in _TENSOR_FIELDS if n not in _OPTIONAL_FIELDS and n not in tensors]
        if missing_t:
            raise ValueError(f"{d / SCORES_FILE} lacks tensors {', '.join(missing_t)}")
        meta.pop("format_version", None)
        return cls(**{n: tensors.get(n) for n in _TENSOR_FIELDS}, meta=meta)

    # -------------------------------------------------------------- plotting
    def plot(self, path: str | os.PathLike) -> None:
        """Write a PNG: heat maps of head and neuron scores per layer, channel scores, layer scores."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n_rows = 4
        fig, axes = plt.subplots(n_rows, 1, figsize=(10, 3.2 * n_rows))
        try:
            for ax, name in zip(axes[:2], ("heads", "neurons")):
                data = getattr(self, name).float().numpy()
                im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis")
                ax.set_title(f"{name} importance")
                ax.set_ylabel("layer")
                ax.set_xlabel("head" if name == "heads" else "neuron")
                fig.colorbar(im, ax=ax)
            ax = axes[2]
            ax.plot(self.channels.float().numpy(), lw=0.8)
            ax.set_title("embedding channel importance (sum over norms)")
            ax.set_xlabel("channel")
            ax = axes[3]
            layers = range(self.num_layers)
            ax.bar([i - 0.2 for i in layers], self.block_influence.float().numpy(), width=0.4, label="block influence")
            if self.lm_loss_drop is not None:
                ax2 = ax.twinx()
                ax2.bar([i + 0.2 for i in layers], self.lm_loss_drop.float().numpy(), width=0.4,
                        color="tab:orange", label="LM-loss drop")
                ax2.set_ylabel("LM-loss increase")
                ax2.legend(loc="upper right")
            ax.set_ylabel("block influence")
            ax.set_xlabel("layer")
            ax.legend(loc="upper left")
            ax.set_title("layer importance")
            fig.tight_layout()
            out = Path(path)
            out.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(out, lambda p: fig.savefig(p, format="png", dpi=100))
        finally:
            plt.close(fig)


def validate_options(seq_agg: Any, batch_agg: Any, layer_metrics: Any, *, prefix: str = "") -> tuple[str, ...]:
    """Check importance options before any work; errors name the option (``prefix`` + its name).

    Returns:
        ``layer_metrics`` as a tuple.
    """
    from minitron.ops.importance import AGGREGATIONS

    for name, v in (("seq_agg", seq_agg), ("batch_agg", batch_agg)):
        if not isinstance(v, str) or v not in AGGREGATIONS:
            raise ValueError(f"{prefix}{name} must be one of {', '.join(AGGREGATIONS)}; got {v!r}")
    if isinstance(layer_metrics, str) or not isinstance(layer_metrics, (list, tuple)):
        raise TypeError(f"{prefix}layer_metrics must be a list of metric names ({', '.join(LAYER_METRICS)}), "
                        f"got {layer_metrics!r}")
    bad = [m for m in layer_metrics if m not in LAYER_METRICS]
    if bad:
        raise ValueError(f"{prefix}layer_metrics: unknown metric(s) {bad}; valid: {', '.join(LAYER_METRICS)}")
    return tuple(layer_metrics)


def shape_signature(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer name with its shape (state_dict order), identifying a model's layout."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
    return h.hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _check_layer_list(layers: Any, num_layers: int, name: str) -> list[int]:
    if isinstance(layers, torch.Tensor):
        layers = layers.tolist()
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"{name} must be a sequence of layer indices, got {type(layers).__name__}")
    out = list(layers)
    for i in out:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{name} must hold ints, got {i!r}")
        if not 0 <= i < num_layers:
            raise ValueError(f"{name}: layer index {i} out of range [0, {num_layers})")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has duplicate layer indices: {out}")
    return sorted(out)


# ---------------------------------------------------------------------------------------------- estimation
def _first_tensor(args: tuple, kwargs: Mapping[str, Any], name: str) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get(name)
    if isinstance(value, torch.Tensor):
        return value
    raise RuntimeError(f"could not find the {name} tensor among the layer's inputs")


def _output_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _Skip(nn.Module):
    """Stands in for a decoder layer: returns its hidden-states input unchanged (tensor or 1-tuple)."""

    def __init__(self, as_tuple: bool, block_type: Optional[str] = None) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        if block_type is not None:  # a hybrid model's forward picks the layer's mask by its block_type (Nemotron-H)
            self.block_type = block_type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        h = _first_tensor(args, kwargs, "hidden_states")
        return (h,) if self.as_tuple else h


def _validate_batch(batch: Any, index: int, vocab_size: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch {index}: expected a dict with 'input_ids', got {type(batch).__name__}")
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"batch {index}: 'input_ids' must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"batch {index}: 'input_ids' must be a [batch, seq] int64 tensor, got shape {tuple(ids.shape)} {ids.dtype}"
        )
    if ids.numel() == 0:
        raise ValueError(f"batch {index}: 'input_ids' is empty (shape {tuple(ids.shape)})")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"batch {index}: token ids must lie in [0, {vocab_size}), got range [{lo}, {hi}]")
    mask = batch.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"batch {index}: 'attention_mask' must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(
                f"batch {index}: 'attention_mask' shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}"
            )
        if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"batch {index}: 'attention_mask' must hold only 0 and 1")
    return ids.long(), (None if mask is None else mask.bool())


def _activation_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _lm_loss_sums(logits: torch.Tensor, ids: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[float, int]:
    """Summed next-token NLL (fp32) and token count; a target counts when it and its context token are real."""
    logits = logits[:, :-1].float()
    target = ids[:, 1:]
    if mask is not None:
        valid = mask[:, 1:] & mask[:, :-1]
        target = target.masked_fill(~valid, -100)
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return float(nll), int((target != -100).sum())


class _Collector:
    """Owns the accumulators and the hooks of one estimation run."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, *, seq_agg: str, batch_agg: str,
                 block_influence: bool, backend: str, device: torch.device, dtype: torch.dtype) -> None:
        from minitron.ops import BlockInfluence, ImportanceAccumulator

        self.model, self.adapter = model, adapter
        self.dims = adapter.dims(model.config)
        d = self.dims
        self.layers = list(adapter.layers(model))[: d.num_hidden_layers]
        kw: dict[str, Any] = {"seq_agg": seq_agg, "batch_agg": batch_agg, "device": device, "backend": backend}
        # constructing every accumulator validates seq_agg / batch_agg / backend before any forward pass,
        # and one tiny update proves the backend can run on this device and dtype
        probe = ImportanceAccumulator(1, **kw)
        probe.update(torch.zeros(1, 1, 1, device=device, dtype=dtype))
        # attention heads (None for a layer without attention: a hybrid model's Mamba / MLP layers)
        self.heads = [ImportanceAccumulator(d.num_attention_heads, group_size=d.head_dim, **kw)
                      if adapter.has_attention(layer) else None for layer in self.layers]
        # dense-MLP neurons (None for a MoE layer: its experts are scored by self.moe; None without an MLP)
        self.neurons = [None if adapter.is_moe_layer(layer) or not adapter.has_mlp(layer)
                        else ImportanceAccumulator(d.intermediate_size, **kw) for layer in self.layers]
        self.mamba = None
        if any(adapter.is_mamba_layer(layer) for layer in self.layers):
            from minitron.compress.mamba import MambaImportance

            self.mamba = MambaImportance(model, seq_agg=seq_agg, batch_agg=batch_agg, backend=backend, device=device,
                                         owner=self)
        self.moe = None
        if adapter.moe_dims(model.config) is not None:
            from minitron.compress.moe_importance import MoeCapture

            self.moe = MoeCapture(self, adapter, self.layers, model.config, kw, dtype)  # type: ignore[arg-type]
        self.norm_modules = [n for layer in self.layers for n in adapter.layer_norms(layer)] + [adapter.final_norm(model)]
        self.channels = [ImportanceAccumulator(d.hidden_size, **kw) for _ in self.norm_modules]
        self.bi = None
        if block_influence:
            self.bi = BlockInfluence(len(self.layers), device=device, backend=backend)
            z = torch.zeros(1, 1, 1, device=device, dtype=dtype)
            BlockInfluence(1, device=device, backend=backend).update(0, z, z)
        self.mask: Optional[torch.Tensor] = None
        self.layer_returns_tuple: Optional[bool] = None
        self.handles: list[Any] = []
        #: hooks record only while True (the streamed path runs layers on skip streams with it False)
        self.active = True

    def attach(self) -> None:
        for i, layer in enumerate(self.layers):
            if self.heads[i] is not None:
                self.handles.append(self.adapter.o_proj(layer).register_forward_pre_hook(self._pre(self.heads[i])))
            if self.neurons[i] is not None:
                self.handles.append(self.adapter.down_proj(layer).register_forward_pre_hook(self._pre(self.neurons[i])))
            self.handles.append(layer.register_forward_hook(self._layer_hook(i), with_kwargs=True))
        for module, acc in zip(self.norm_modules, self.channels):
            self.handles.append(module.register_forward_hook(self._post(acc)))
        if self.moe is not None:
            self.moe.attach()
        if self.mamba is not None:
            self.mamba.attach()

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if self.moe is not None:
            self.moe.detach()
        if self.mamba is not None:
            self.mamba.detach()

    def all_reduce(self) -> None:
        """Combine every accumulator across the ranks of the default process group (collective)."""
        from minitron.compress.distributed import collective, group_for

        group = group_for(self.channels[0].device)
        for i, (h, n) in enumerate(zip(self.heads, self.neurons)):
            if h is not None:
                collective(f"all_reduce of the head accumulator of layer {i}", lambda: h.all_reduce(group))
            if n is not None:
                collective(f"all_reduce of the neuron accumulator of layer {i}", lambda: n.all_reduce(group))
        for j, c in enumerate(self.channels):
            collective(f"all_reduce of channel accumulator {j}", lambda: c.all_reduce(group))
        if self.bi is not None:
            collective("all_reduce of the block influence", lambda: self.bi.all_reduce(group))
        if self.moe is not None:
            self.moe.all_reduce(group)
        if self.mamba is not None:
            collective("all_reduce of the Mamba accumulators", lambda: self.mamba.all_reduce(group))

    def _pre(self, acc: Any) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            if self.active:
                acc.update(args[0], self.mask)

        return hook

    def _post(self, acc: Any) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.active:
                acc.update(_output_tensor(output), self.mask)

        return hook

    def _layer_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.layer_returns_tuple is None:
                self.layer_returns_tuple = isinstance(output, (tuple, list))
            if self.bi is not None and self.active:
                h_in = _first_tensor(args, kwargs, "hidden_states")
                self.bi.update(index, h_in, _output_tensor(output), self.mask)

        return hook


def _scores(acc: Any, where: str) -> torch.Tensor:
    """``acc.value()`` as fp32 on the CPU; non-finite activations are reported with the module they came from."""
    from minitron.ops.importance import NonFiniteActivationError

    try:
        return acc.value().float().cpu()
    except NonFiniteActivationError as exc:
        raise NonFiniteActivationError(
            f"non-finite activations in the {where} during importance estimation ({exc}); the model or the "
            "calibration data produces NaN/inf: check the checkpoint's weights and the data") from exc


def _check_estimation_args(seq_agg: Any, batch_agg: Any, layer_metrics: Any, max_batches: Any, backend: Any,
                           batches: Any) -> None:
    """Type/value checks shared by the in-memory and the streamed estimation (before any work)."""
    for name, value in (("seq_agg", seq_agg), ("batch_agg", batch_agg), ("backend", backend)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if isinstance(layer_metrics, str) or not isinstance(layer_metrics, (list, tuple, set, frozenset)):
        raise TypeError(f"layer_metrics must be a tuple of metric names, got {layer_metrics!r}")
    bad = [m for m in layer_metrics if m not in LAYER_METRICS]
    if bad:
        raise ValueError(f"layer_metrics: unknown metric(s) {bad}; choose from {LAYER_METRICS}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    if batches is None or isinstance(batches, (str, bytes, Mapping)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"batches must be an iterable of dicts with 'input_ids', got {type(batches).__name__}"
        )


def _args_fingerprint(adapter: ModelAdapter, config: Any, signature: str, *, seq_agg: str, batch_agg: str,
                      layer_metrics: Sequence[str], max_batches: Optional[int], mode: str,
                      depth_max_tokens: Optional[int] = None) -> dict:
    """The arguments every rank of a distributed run must share (compared by an all-gather)."""
    return {"seq_agg": seq_agg, "batch_agg": batch_agg, "layer_metrics": list(layer_metrics),
            "max_batches": max_batches, "depth_max_tokens": depth_max_tokens, "model (config fingerprint)": adapter.fingerprint(config),
            "model (shape signature)": signature, "mode": mode}


def _data_fingerprint(digest: Any) -> dict:
    return {"number of calibration batches": digest.count, "calibration data (sha256 of all batches)": digest.hexdigest()}


def _reduce_counts(num_samples: int, num_tokens: int, num_batches: int) -> tuple[int, int, int]:
    """Sum the sample/token/batch counters over the ranks (identity on one process)."""
    from minitron.compress.distributed import all_reduce_sum_, rank_info

    if not rank_info().distributed:
        return num_samples, num_tokens, num_batches
    t = all_reduce_sum_(torch.tensor([num_samples, num_tokens, num_batches], dtype=torch.int64),
                        "all_reduce of the sample/token/batch counts")
    a, b, c = (int(v) for v in t.tolist())
    return a, b, c


def _reduce_loss_sums(sums: list[float], counts: list[int]) -> tuple[list[float], list[int]]:
    """Sum LM-loss (NLL sum, target count) pairs over the ranks (identity on one process)."""
    from minitron.compress.distributed import all_reduce_sum_, rank_info

    if not rank_info().distributed:
        return sums, counts
    s = all_reduce_sum_(torch.tensor(sums, dtype=torch.float64), "all_reduce of the LM-loss sums")
    c = all_reduce_sum_(torch.tensor(counts, dtype=torch.int64), "all_reduce of the LM-loss target counts")
    return [float(v) for v in s.tolist()], [int(v) for v in c.tolist()]


def _assemble_scores(collector: "_Collector", adapter: ModelAdapter, config: Any, signature: str, *,
                     seq_agg: str, batch_agg: str, layer_metrics: Sequence[str], num_samples: int, num_tokens: int,
                     num_batches: int, base_loss: Optional[float], lm_loss_drop: Optional[torch.Tensor],
                     extra_meta: Optional[dict] = None) -> ImportanceScores:
    """Turn the (reduced) accumulators into :class:`ImportanceScores`."""
    dims = adapter.dims(config)
    heads = torch.stack([torch.zeros(dims.num_attention_heads) if a is None else _scores(a, f"attention heads of layer {i}")
                         for i, a in enumerate(collector.heads)])
    kv = heads.view(dims.num_hidden_layers, dims.num_key_value_heads, dims.heads_per_group).sum(-1)
    neurons = torch.stack([torch.zeros(dims.intermediate_size) if a is None else _scores(a, f"MLP neurons of layer {i}")
                           for i, a in enumerate(collector.neurons)])
    moe_fields = {} if collector.moe is None else collector.moe.scores(dims.num_hidden_layers, num_tokens, _scores)
    if collector.mamba is not None:
        moe_fields.update(collector.mamba.scores(_scores))
    channels = torch.stack([_scores(a, f"embedding channels at layer {i}")
                            for i, a in enumerate(collector.channels)]).sum(0)
    if collector.bi is not None:
        bi = _scores(collector.bi, "block influence")
    else:
        bi = torch.full((dims.num_hidden_layers,), float("nan"))
    meta = {
        "model_type": adapter.model_type,
        "config_fingerprint": adapter.fingerprint(config),
        "shape_signature": signature,
        "seq_agg": seq_agg,
        "batch_agg": batch_agg,
        "layer_metrics": list(layer_metrics),
        "num_samples": num_samples,
        "num_tokens": num_tokens,
        "num_batches": num_batches,
        "base_lm_loss": base_loss,
        "kv_group_aggregation": "sum of the group's query-head scores",
        "channel_sources": f"outputs of {', '.join(_norm_names(adapter, collector.layers[0]))} (every layer) and "
                           "the final norm, aggregated per norm then summed",
    }
    meta.update(extra_meta or {})
    log.info("importance estimated on %d samples (%d tokens)", num_samples, num_tokens)
    if collector.moe is not None:
        meta["expert_scores"] = ("experts: L2 norm over the routed tokens of the router-weighted expert output; "
                                 "expert_frequency: routed tokens / tokens; expert_neurons: act(gate)*up over the "
                                 "tokens routed to the expert, aggregated with seq_agg/batch_agg")
    if collector.mamba is not None:
        meta["mamba_scores"] = ("mamba_heads / mamba_channels: the input of each Mamba layer's out_proj (the grouped "
                                "gated norm's output) per head / per channel, aggregated with seq_agg/batch_agg; "
                                "heads and neurons are 0 on layers without attention / MLP")
    return ImportanceScores(heads=heads, kv_groups=kv, neurons=neurons, channels=channels, block_influence=bi,
                            lm_loss_drop=lm_loss_drop, meta=meta, **moe_fields)


def _norm_names(adapter: ModelAdapter, layer: nn.Module) -> list[str]:
    """The attribute paths of ``adapter.layer_norms(layer)`` inside ``layer`` (e.g. ``input_layernorm``)."""
    names = {id(m): n for n, m in layer.named_modules() if n}
    return [names.get(id(m), type(m).__name__) for m in adapter.layer_norms(layer)]


def _drops_from_sums(sums: list[float], counts: list[int], base_loss: float) -> torch.Tensor:
    drops = torch.empty(len(sums), dtype=torch.float32)
    for l, (s_sum, s_cnt) in enumerate(zip(sums, counts)):
        drops[l] = s_sum / s_cnt - base_loss
    return drops


DEPTH_MIN_TOKENS = 4096
"""Floor of the default depth (LM-loss-drop) token budget."""


def depth_token_budget(depth_max_tokens: Optional[int], total_tokens: int, num_layers: int) -> int:
    """The token budget of the LM-loss-drop depth metric.

    ``depth_max_tokens`` when given (a positive int); by default about the cost of the width pass: the calibration
    tokens divided by the number of layers (rounded up), but never below :data:`DEPTH_MIN_TOKENS`.
    """
    if depth_max_tokens is not None:
        check_depth_max_tokens(depth_max_tokens)
        return int(depth_max_tokens)
    return max(DEPTH_MIN_TOKENS, -(-int(total_tokens) // max(int(num_layers), 1)))


def check_depth_max_tokens(value: Any) -> None:
    """ValueError naming ``depth_max_tokens`` (``--depth-max-tokens``) unless ``value`` is None or an int >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"depth_max_tokens (--depth-max-tokens) must be a positive int or None, got {value!r}")


def depth_batch_count(batch_tokens: Sequence[int], budget: int) -> int:
    """How many of the first calibration batches (global order) the depth metric uses: the longest prefix whose
    tokens fit ``budget``, at least one batch."""
    k, used = 0, 0
    for n in batch_tokens:
        if k and used + n > budget:
            break
        if not k and n > budget:
            return 1
        k, used = k + 1, used + n
    return max(k, 1)


def _batch_tokens(ids: torch.Tensor, mask: Optional[torch.Tensor]) -> int:
    return int(mask.sum()) if mask is not None else ids.numel()


def _log_depth_cost(mode: str, num_layers: int, k: int, tokens: int, total_batches: int, budget: int) -> None:
    passes = (f"{num_layers} full forward passes over those batches" if mode == "in-memory" else
              f"{num_layers * (num_layers + 1) // 2} layer passes per batch, "
              f"{k * num_layers * (num_layers + 1) // 2} in all")
    log.info("depth (LM-loss drop) scores, %s: %d layers on the first %d of %d calibration batches (%d tokens, "
             "budget %d, --depth-max-tokens): %s", mode, num_layers, k, total_batches, tokens, budget, passes)


def estimate_importance(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    seq_agg: str = "mean",
    batch_agg: str = "l2",
    layer_metrics: Sequence[str] = ("block_influence", "lm_loss"),
    max_batches: Optional[int] = None,
    progress: bool = True,
    backend: str = "auto",
    depth_max_tokens: Optional[int] = None,
) -> ImportanceScores:
    """Estimate the importance of every prunable unit of ``model`` on calibration batches.

    Under ``torch.distributed`` (an initialised default process group, e.g. launched by ``torchrun``) this
    is a collective: rank ``r`` of ``world`` runs the batches ``i`` with ``i % world == r``, every rank
    checks that all ranks got the same arguments and data (``ValueError`` naming the mismatch), and the
    accumulators, block-influence and LM-loss sums are all-reduced, so every rank returns the scores of all
    batches (equal to the single-process scores up to fp32 reduction order). See
    :mod:`minitron.compress.distributed`.

    Args:
        model: a supported transformers ``*ForCausalLM`` model (any dtype/device). It is run in eval
            mode under ``torch.no_grad`` and left as it was (training flag restored, hooks removed).
        batches: iterable of dicts with ``"input_ids"`` [B, S] int64 and optional ``"attention_mask"``
            [B, S] (1 = real token, 0 = padding; padding is masked out of every score). Batches may
            differ in shape. Read once (kept on CPU when the ``lm_loss`` metric needs more passes).
        seq_agg: aggregation over the tokens of one sample (default ``"mean"``, the papers' best).
        batch_agg: aggregation over samples (default ``"l2"``, the papers' best).
        layer_metrics: any of ``"block_influence"`` and ``"lm_loss"``. ``"lm_loss"`` costs one extra
            pass over the depth batches per layer (the layer is swapped for an identity module).
        max_batches: use at most this many batches (counted over all ranks).
        progress: show a tqdm progress bar (stderr; rank 0 only under torch.distributed).
        backend: kernel backend for the accumulators (``"auto"``, ``"cpp"``, ``"cuda"``, ``"triton"``,
            ``"reference"``).
        depth_max_tokens: token budget of the ``"lm_loss"`` metric: its base and skip losses use the first
            calibration batches (global order) whose tokens fit it, at least one batch; None (default): the
            calibration tokens / the number of layers, at least :data:`DEPTH_MIN_TOKENS`
            (:func:`depth_token_budget`). The counts are in ``meta`` (``depth_num_batches``, ``depth_num_tokens``).
    Returns:
        :class:`ImportanceScores` (fp32 CPU tensors).
    Raises:
        ValueError / TypeError: bad arguments (before any forward pass) or a malformed batch (before
            that batch is run).
        minitron.compress.distributed.DistributedImportanceError: a collective failed (another rank died
            or the process group timed out).
    """
    from minitron.compress.distributed import check_same_on_all_ranks, rank_info

    adapter = get_adapter(model)
    adapter.check_model(model)
    _check_estimation_args(seq_agg, batch_agg, layer_metrics, max_batches, backend, batches)
    check_depth_max_tokens(depth_max_tokens)
    want_loss = "lm_loss" in layer_metrics
    info = rank_info()
    progress = bool(progress) and info.rank == 0  # one progress bar per run, not one per rank
    signature = shape_signature(model)
    check_same_on_all_ranks(
        _args_fingerprint(adapter, model.config, signature, seq_agg=seq_agg, batch_agg=batch_agg,
                          layer_metrics=layer_metrics, max_batches=max_batches, mode="in-memory",
                          depth_max_tokens=depth_max_tokens),
        stage="arguments")
    device = _model_device(model)
    collector = _Collector(model, adapter, seq_agg=seq_agg, batch_agg=batch_agg,
                           block_influence="block_influence" in layer_metrics, backend=backend, device=device,
                           dtype=_activation_dtype(model))
    was_training = model.training
    model.eval()
    try:
        run = _calibration_pass(model, adapter, collector, batches, max_batches, want_loss, progress)
        base_loss, lm_loss_drop, depth_meta = None, None, None
        if want_loss:
            n_layers = adapter.dims(model.config).num_hidden_layers
            budget = depth_token_budget(depth_max_tokens, sum(run.batch_tokens), n_layers)
            k = depth_batch_count(run.batch_tokens, budget)
            depth_meta = {"depth_max_tokens": budget, "depth_num_batches": k,
                          "depth_num_tokens": sum(run.batch_tokens[:k])}
            _log_depth_cost("in-memory", n_layers, k, depth_meta["depth_num_tokens"], len(run.batch_tokens), budget)
            kept = [(ids, mask) for i, ids, mask, _, _ in run.kept if i < k]
            base_loss = _base_loss(sum(e[3] for e in run.kept if e[0] < k), sum(e[4] for e in run.kept if e[0] < k))
            sums, counts = _layer_loss_sums(model, adapter, kept, collector.layer_returns_tuple, device,
                                            progress)
            sums, counts = _reduce_loss_sums(sums, counts)
            lm_loss_drop = _drops_from_sums(sums, counts, base_loss)
    finally:
        model.train(was_training)

    if info.distributed:
        collector.all_reduce()
    scores = _assemble_scores(collector, adapter, model.config, signature, seq_agg=seq_agg, batch_agg=batch_agg,
                            layer_metrics=layer_metrics, num_samples=run.num_samples, num_tokens=run.num_tokens,
                            num_batches=run.num_batches, base_loss=base_loss, lm_loss_drop=lm_loss_drop,
                            extra_meta={**({"world_size": info.world} if info.distributed else {}),
                                        **(depth_meta or {})})
    if info.distributed:
        from minitron.compress.distributed import barrier

        barrier("barrier at the end of importance estimation")
    return scores


@dataclasses.dataclass
class _PassTotals:
    """What the calibration pass counted (reduced over the ranks, except ``kept``): this rank's batches kept for the
    LM-loss metric as ``(global index, ids, mask, base NLL sum, target count)``, the token count of every batch
    (all ranks', global order), samples/tokens/batches."""

    kept: list = dataclasses.field(default_factory=list)
    batch_tokens: list = dataclasses.field(default_factory=list)
    num_samples: int = 0
    num_tokens: int = 0
    num_batches: int = 0


def _base_loss(loss_sum: float, loss_count: int) -> float:
    """The mean next-token NLL of the unmodified model over all ranks' targets."""
    (loss_sum,), (loss_count,) = _reduce_loss_sums([loss_sum], [loss_count])
    if loss_count == 0:
        raise ValueError("the calibration batches hold no next-token targets (sequences of length >= 2 needed)")
    return loss_sum / loss_count


def _calibration_pass(model: nn.Module, adapter: ModelAdapter, collector: "_Collector", batches: Iterable[Any],
                      max_batches: Optional[int], want_loss: bool, progress: bool) -> _PassTotals:
    """One forward pass over this rank's calibration batches with the collector's hooks on (the LM head only when
    the LM-loss metric needs the base loss); checks the data is the same on every rank."""
    from tqdm.auto import tqdm

    from minitron.compress.distributed import BatchDigest, check_same_on_all_ranks, owns_batch, rank_info

    info = rank_info()
    device = _model_device(model)
    vocab = adapter.dims(model.config).vocab_size
    total = None
    if hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
        if max_batches is not None:
            total = min(total, max_batches)
        if info.distributed:
            total = len(range(info.rank, total, info.world))
    t = _PassTotals()
    digest = BatchDigest()
    runner = model if want_loss else adapter.base_model(model)  # no LM head needed without the loss
    collector.attach()
    bar = tqdm(total=total, desc="importance", unit="batch", disable=not progress)
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                ids, mask = _validate_batch(batch, i, vocab)
                t.batch_tokens.append(_batch_tokens(ids, mask))
                if info.distributed:
                    digest.update(ids, mask)
                    if not owns_batch(i, info):
                        continue
                ids_d = ids.to(device)
                mask_d = None if mask is None else mask.to(device)
                collector.mask = mask_d
                out = runner(input_ids=ids_d, attention_mask=None if mask_d is None else mask_d.long(),
                             use_cache=False)
                if want_loss:
                    s, c = _lm_loss_sums(out.logits, ids_d, mask_d)
                    t.kept.append((i, ids, mask, s, c))
                t.num_batches += 1
                t.num_samples += ids.shape[0]
                t.num_tokens += t.batch_tokens[-1]
                bar.update(1)
    finally:
        bar.close()
        collector.detach()
        collector.mask = None
    if info.distributed:
        check_same_on_all_ranks(_data_fingerprint(digest), stage="calibration data")
        t.num_samples, t.num_tokens, t.num_batches = _reduce_counts(t.num_samples, t.num_tokens, t.num_batches)
    if t.num_samples == 0:
        raise ValueError("batches is empty: importance needs at least one calibration batch")
    return t


def _layer_loss_sums(model: nn.Module, adapter: ModelAdapter, batches: list, as_tuple: Optional[bool],
                     device: torch.device, progress: bool) -> tuple[list[float], list[int]]:
    """Per layer: the summed next-token NLL and the target count with that layer replaced by the identity."""
    from tqdm.auto import tqdm

    layers = adapter.layers(model)
    n = adapter.dims(model.config).num_hidden_layers
    sums: list[float] = []
    counts: list[int] = []
    bar = tqdm(total=n * len(batches), desc="layer skip loss", unit="batch", disable=not progress)
    with torch.no_grad():
        for l in range(n):
            original = layers[l]
            layers[l] = _Skip(bool(as_tuple), getattr(original, "block_type", None))
            try:
                s_sum, s_cnt = 0.0, 0
                for ids, mask in batches:
                    ids_d = ids.to(device)
                    mask_d = None if mask is None else mask.to(device)
                    out = model(input_ids=ids_d, attention_mask=None if mask_d is None else mask_d.long(),
                                use_cache=False)
                    s, c = _lm_loss_sums(out.logits, ids_d, mask_d)
                    s_sum, s_cnt = s_sum + s, s_cnt + c
                    bar.update(1)
            finally:
                layers[l] = original
            sums.append(s_sum)
            counts.append(s_cnt)
    bar.close()
    return sums, counts
