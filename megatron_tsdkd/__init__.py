"""megatron-tsdkd: Token-Selective Dual Knowledge Distillation (TSD-KD) on megatron-core."""

__version__ = "0.1.0"
