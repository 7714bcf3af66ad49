"""The one training step and loop (trainer.py, loop.py) and the engines that supply what differs: megatron/
(megatron-core models at TP x PP, its pipeline schedule and optimizer) and deepspeed/ (Hugging Face models under ZeRO);
metrics, checkpoints, the rollout guard, preemption and the job around them."""
