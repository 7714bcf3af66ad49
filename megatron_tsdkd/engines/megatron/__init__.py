"""The megatron-core engine: co-located TP x PP models, the 1F1B schedule, the (distributed) optimizer."""
