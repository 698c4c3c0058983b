"""The typed inputs of the driver's stages: what a user can set, declared once.

Every :mod:`minitron.api` function takes these specs (plus ``TrainConfig``, ``DistillConfig`` and
``StoredDistillConfig`` of :mod:`minitron.train`); the CLI generates its flags from their fields and the pipeline
YAML maps its sections onto them (:mod:`minitron.options`), so a setting added here reaches the Python API,
the command line and the YAML at once, with one help text, one default and one validation, run when the spec
is built, before any model or data is loaded.

* :class:`DataSpec`: the data source, split, column, packing length, token caps, tokenizer (and evaluation data);
* :class:`ModelSpec`: the model (path / hub name / loaded module), device, streaming;
* :class:`ImportanceSpec`, :class:`PruneSpec`, :class:`StoreSpec`, :class:`EvalSpec`: one stage's settings.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any, Optional, Tuple

from minitron.options import option, parse_bf16, parse_int_list, parse_str_tuple

__all__ = ["DataSpec", "ModelSpec", "ImportanceSpec", "PruneSpec", "StoreSpec", "EvalSpec", "WIDTH_KEYS",
           "MOE_WIDTH_KEYS", "MAMBA_WIDTH_KEYS", "DEPTH_KEYS", "parse_size", "check_positive_int"]

WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
#: Width targets of mixture-of-experts models (in :attr:`PruneSpec.width` only when set).
MOE_WIDTH_KEYS = ("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size")
#: Width targets of hybrid Mamba models (Nemotron-H; in :attr:`PruneSpec.width` only when set).
MAMBA_WIDTH_KEYS = ("mamba_num_heads", "mamba_head_dim")
DEPTH_KEYS = ("num_hidden_layers", "depth_metric", "contiguous", "layers_to_drop")

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(s: str) -> int:
    """A byte count: ``5GB``, ``500MB``, ``2GiB`` or a plain integer."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(s))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 5GB, 500MB or 2GiB, got {s!r}")
    n = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if n < 1:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {s!r}")
    return n


def check_positive_int(name: str, v: Any, *, optional: bool = False) -> None:
    """ValueError naming ``name`` unless ``v`` is an int >= 1 (or None when ``optional``)."""
    if optional and v is None:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {v!r}")


@dataclasses.dataclass
class DataSpec:
    """Where the text comes from and how it is packed (see :func:`minitron.io.data.load_packed`).

    ``data``/``eval_data`` are a path, a hub dataset name, a ``datasets.Dataset``, a list of strings or a
    :class:`~minitron.io.data.PackedDataset` (then used as packed).
    """

    data: Any = option(None, help="text data: a .txt/.json/.jsonl/.parquet/.csv file, a directory of them, a saved "
                       "dataset, or a hub dataset name", yaml="train")
    text_column: str = option("text", help="column holding the text")
    split: Optional[str] = option(None, help="dataset split; slicing like train[:10%] works", default_text="train")
    dataset_config: Optional[str] = option(None, help="hub dataset configuration name")
    seq_len: Optional[int] = option(None, help="packed sequence length",
                                    default_text="min(512, the model's max_position_embeddings)")
    max_tokens: Optional[int] = option(None, help="use at most this many tokens of the data", default_text="all")
    tokenizer: Any = option(None, help="tokenizer directory", default_text="the model's")
    eval_data: Any = option(None, help="evaluation data (perplexity during training)", yaml="eval")
    eval_split: Optional[str] = option(None, help="split of the evaluation data", default_text="train")
    eval_max_tokens: Optional[int] = option(None, help="use at most this many evaluation tokens", default_text="all")
    eval_name: Optional[str] = option(None, help="label of the evaluation data in results tables", cli=False,
                                      default_text="the file name")

    def __post_init__(self) -> None:
        if not isinstance(self.text_column, str) or not self.text_column:
            raise TypeError(f"DataSpec.text_column must be a column name, got {self.text_column!r}")
        for k in ("seq_len", "max_tokens", "eval_max_tokens"):
            check_positive_int(f"DataSpec.{k}", getattr(self, k), optional=True)

    def pack_args(self, *, eval: bool = False) -> dict:
        """Keyword arguments of :func:`~minitron.io.data.load_packed` for the training (or evaluation) data."""
        return dict(text_column=self.text_column, split=self.eval_split if eval else self.split,
                    dataset_config=self.dataset_config, max_tokens=self.eval_max_tokens if eval else self.max_tokens)


@dataclasses.dataclass
class ModelSpec:
    """A model input: a checkpoint path / training output directory / hub name, or a loaded ``*ForCausalLM``."""

    model: Any = option(None, help="checkpoint directory, training output directory or hub name")
    device: str = option("auto", help="auto, cpu, cuda, cuda:N")
    streaming: Optional[bool] = option(None, help="read a local checkpoint piece by piece instead of loading the "
                                       "model", default_text="when the model would not fit comfortably in memory")
    allow_nonfinite: bool = option(False, help="load a checkpoint holding NaN/inf weights (refused otherwise), to "
                                   "inspect a broken model")

    def __post_init__(self) -> None:
        if self.streaming is not None and not isinstance(self.streaming, bool):
            raise TypeError(f"streaming must be True, False or None, got {self.streaming!r}")
        if not isinstance(self.device, str):
            raise TypeError(f"device must be a string (auto, cpu, cuda, cuda:N), got {self.device!r}")

    def load(self, tokenizer: Any = None) -> Tuple[Any, Any, Optional[str]]:
        """``(module, tokenizer, source directory or None)``: the one place a model is loaded
        (:func:`minitron.io.inputs.load_model_like`; checkpoints load strictly)."""
        from minitron.io.inputs import load_model_like

        return load_model_like(self.model, tokenizer, allow_nonfinite=self.allow_nonfinite)

    @property
    def label(self) -> str:
        """The model as it is named in logs and ``run.json``."""
        from minitron.io.inputs import is_path

        return str(self.model) if is_path(self.model) else "<module>"


@dataclasses.dataclass
class ImportanceSpec:
    """Settings of importance estimation (:func:`minitron.compress.importance.estimate_importance`)."""

    batch_size: int = option(8, help="calibration sequences per batch")
    max_batches: Optional[int] = option(32, help="calibration batches at most")
    seq_agg: str = option("mean", help="aggregation over the tokens of a sequence")
    batch_agg: str = option("l2", help="aggregation over batches")
    layer_metrics: Tuple[str, ...] = option(("block_influence", "lm_loss"), help="layer metrics, comma-separated: "
                                            "block_influence, lm_loss", parse=parse_str_tuple)
    depth_max_tokens: Optional[int] = option(
        None, help="token budget of the lm_loss depth metric (it costs num_layers extra forwards over its tokens, "
                   "L(L+1)/2 layer passes per batch when streamed): its base and skip losses use the first "
                   "calibration batches whose tokens fit, at least one batch",
        default_text="about the width pass's cost: calibration tokens / num_layers, at least 4096")
    backend: str = option("auto", help="kernel backend: auto, cpp, cuda, triton, reference")
    spill_dir: Optional[str] = option(None, help="where streamed hidden states spill when they do not fit",
                                      default_text="the system temporary directory")
    shuffle_seed: Optional[int] = option(None, help="shuffle the calibration sequences with this seed", cli=False,
                                         default_text="no shuffling")

    def __post_init__(self) -> None:
        from minitron.compress.importance import check_depth_max_tokens, validate_options

        check_positive_int("batch_size", self.batch_size)
        check_positive_int("max_batches", self.max_batches, optional=True)
        check_depth_max_tokens(self.depth_max_tokens)
        self.layer_metrics = tuple(validate_options(self.seq_agg, self.batch_agg, self.layer_metrics))


@dataclasses.dataclass
class PruneSpec:
    """Pruning targets: width (any of the four sizes) and/or depth. A size left at None keeps the teacher's."""

    hidden_size: Optional[int] = option(None, help="target hidden size", default_text="keep the teacher's")
    intermediate_size: Optional[int] = option(None, help="target MLP intermediate size",
                                              default_text="keep the teacher's")
    num_attention_heads: Optional[int] = option(None, help="target query heads", default_text="keep the teacher's")
    num_key_value_heads: Optional[int] = option(None, help="target key/value heads",
                                                default_text="keep the teacher's")
    num_experts: Optional[int] = option(None, help="target routed experts per MoE layer (the experts with the highest "
                                        "router-weighted output norm are kept, with their router rows); at least "
                                        "num_experts_per_tok", default_text="keep the teacher's")
    moe_intermediate_size: Optional[int] = option(None, help="target MLP width of every routed expert (each kept "
                                                  "expert keeps its own most important neurons; one width for all, "
                                                  "as transformers' fused expert format requires)",
                                                  default_text="keep the teacher's")
    shared_expert_intermediate_size: Optional[int] = option(None, help="target MLP width of the shared expert "
                                                            "(Qwen2-MoE)", default_text="keep the teacher's")
    mamba_num_heads: Optional[int] = option(None, help="target Mamba heads per Mamba layer of a hybrid model "
                                            "(Nemotron-H), a multiple of n_groups: every SSM group keeps the same "
                                            "number of heads, its most important ones (group-aware, Minitron-SSM)",
                                            default_text="keep the teacher's")
    mamba_head_dim: Optional[int] = option(None, help="target Mamba head dimension of a hybrid model (the same "
                                           "channels kept in every head of a layer)", default_text="keep the teacher's")
    num_hidden_layers: Optional[int] = option(None, help="target decoder layers (depth pruning)",
                                              flag=("--num-layers", "--num-hidden-layers"),
                                              default_text="keep the teacher's")
    depth_metric: str = option("lm_loss", help="layer importance used for depth pruning",
                               choices=("lm_loss", "block_influence"))
    contiguous: bool = option(True, help="drop individual layers, not one contiguous block",
                              flag=("--non-contiguous",), default_text="one contiguous block")
    layers_to_drop: Optional[list] = option(None, help="explicit layers to drop, e.g. 3,4", parse=parse_int_list,
                                            default_text="chosen by importance")
    backend: str = option("auto", help="slicing kernel backend: auto, cpp, cuda, triton, reference")
    shard_bytes: Optional[int] = option(None, help="output shard size when streaming, e.g. 5GB", parse=parse_size,
                                        flag=("--shard-size",), default_text="5GB, as transformers")

    def __post_init__(self) -> None:
        for k in WIDTH_KEYS + MOE_WIDTH_KEYS + MAMBA_WIDTH_KEYS + ("num_hidden_layers",):
            check_positive_int(f"PruneSpec.{k}", getattr(self, k), optional=True)
        if self.depth_metric not in ("lm_loss", "block_influence"):
            raise ValueError(f"PruneSpec.depth_metric must be lm_loss or block_influence, got {self.depth_metric!r}")
        if not isinstance(self.contiguous, bool):
            raise TypeError(f"PruneSpec.contiguous must be true or false, got {self.contiguous!r}")
        d = self.layers_to_drop
        if d is not None and (not isinstance(d, (list, tuple)) or len(set(d)) != len(d)
                              or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in d)):
            raise ValueError(f"PruneSpec.layers_to_drop must be a list of distinct layer indices, got {d!r}")
        check_positive_int("PruneSpec.shard_bytes", self.shard_bytes, optional=True)

    @property
    def width(self) -> dict:
        """The four dense width targets (None: keep), plus the MoE targets that are set (keyword arguments of
        :func:`~minitron.compress.prune.prune_width` / ``validate_width_targets``)."""
        out = {k: getattr(self, k) for k in WIDTH_KEYS}
        out.update({k: getattr(self, k) for k in MOE_WIDTH_KEYS + MAMBA_WIDTH_KEYS if getattr(self, k) is not None})
        return out

    @property
    def wants_width(self) -> bool:
        return any(v is not None for v in self.width.values())

    @property
    def wants_depth(self) -> bool:
        return self.num_hidden_layers is not None


@dataclasses.dataclass
class StoreSpec:
    """Settings of a teacher top-k logit store (:mod:`minitron.io.logit_store`)."""

    top_k: int = option(64, help="entries kept per token, in [1, vocab_size]")
    temperature: float = option(1.0, help="softmax temperature of the stored log-probabilities, in "
                                "(0, MAX_TEMPERATURE]")
    value_encoding: Optional[str] = option(None, help="how log-probabilities are stored", default_text="the store's")
    batch_size: int = option(8, help="sequences per teacher forward")

    def __post_init__(self) -> None:
        from minitron.io.logit_store import VALUE_ENCODINGS
        from minitron.train.distill import check_temperature

        check_positive_int("top_k", self.top_k)
        check_temperature(self.temperature, "temperature")
        check_positive_int("batch_size", self.batch_size)
        if self.value_encoding is not None and self.value_encoding not in VALUE_ENCODINGS:
            raise ValueError(f"value_encoding must be one of {sorted(VALUE_ENCODINGS)}, got {self.value_encoding!r}")


@dataclasses.dataclass
class EvalSpec:
    """Settings of a perplexity evaluation (:func:`minitron.eval.perplexity.perplexity`)."""

    batch_size: int = option(8, help="sequences per batch")
    max_batches: Optional[int] = option(None, help="batches at most", default_text="all")
    bf16: Any = option(False, help="bf16 autocast: auto, on, off", parse=parse_bf16)

    def __post_init__(self) -> None:
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("max_batches", self.max_batches, optional=True)
        if self.bf16 not in ("auto", True, False):
            raise ValueError(f"bf16 must be auto, True or False, got {self.bf16!r}")
