"""The DeepSpeed engine: Hugging Face models, the student under ZeRO-2/3, the frozen teacher ZeRO-3 partitioned."""
