"""Hugging Face decoders (Qwen2/2.5, Qwen3, Llama 2/3.x) as megatron-core GPTModels, with TP/PP-sharded weights.

source        where a model comes from (HF folder | megatron checkpoint | run folder) and the one loader
token_spec    stop ids, pad id, real and padded vocabulary, computed once from tokenizer + configs
dtypes        the precision-name table
hf_config     HF config -> validated ArchSpec; supported-architecture and parallel-layout checks
builder       ArchSpec -> TransformerConfig -> this rank's GPTModel stage (padded vocab, recompute modes)
attention     core-attention backends behind megatron's local layer spec: te | sdpa | local
mapping       the single HF <-> megatron name/layout mapping, per TP rank and stage
hf_weights    safetensors -> this rank's shard (sliced reads, file integrity checks)
hf_export     this rank's shard -> HF safetensors folder (gathered per stage)
mcore_checkpoint  megatron-core distributed checkpoint of the weights (+ hf_meta/)
convert       HF <-> megatron conversion, one rank's share each (the command is commands/convert.py)
"""
from megatron_tsdkd.models.builder import build_model, padded_vocab_size, transformer_config_from_hf
from megatron_tsdkd.models.errors import (
    ModelError,
    ParallelLayoutError,
    TargetFolderError,
    UnsupportedModelError,
    WeightFileError,
)
from megatron_tsdkd.models.hf_config import ArchSpec, arch_spec, check_parallel_layout, read_hf_config
from megatron_tsdkd.models.hf_export import export_hf
from megatron_tsdkd.models.hf_weights import check_hf_weights, load_hf_weights
from megatron_tsdkd.models.mcore_checkpoint import (
    HF_META_DIR,
    MODEL_KEY,
    copy_hf_meta,
    load_mcore_weights,
    model_sharded_state_dict,
    save_mcore_weights,
)

__all__ = [
    "ArchSpec", "arch_spec", "read_hf_config", "check_parallel_layout", "padded_vocab_size",
    "transformer_config_from_hf", "build_model", "load_hf_weights", "check_hf_weights", "export_hf",
    "model_sharded_state_dict", "save_mcore_weights", "load_mcore_weights", "copy_hf_meta", "MODEL_KEY",
    "HF_META_DIR", "ModelError", "UnsupportedModelError", "ParallelLayoutError", "WeightFileError",
    "TargetFolderError",
]
