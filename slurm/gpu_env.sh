#!/usr/bin/env bash
# CUDA and NCCL settings every Megatron GPU job needs; sourced by the job scripts (values already set win).
# shellcheck disable=SC2034  # exported for the training processes

# Megatron orders tensor-parallel communication and compute on one hardware queue; with more connections the
# all-reduce of a layer can be overtaken by the next kernel and overlap stops working.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# Fewer out-of-memory failures from fragmentation when sequence lengths vary from step to step (rollouts do).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# A rank that dies or hangs in a collective fails the whole job (instead of hanging until the time limit), so
# Slurm can requeue it.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Warnings only; set NCCL_DEBUG=INFO to see which transport (NVLink, InfiniBand, sockets) each ring uses.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# InfiniBand: retry longer on a congested fabric before failing (2^22 * 4.096 us ~ 17 s per attempt).
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
# Cluster-specific, leave unset unless NCCL picks the wrong network (check NCCL_DEBUG=INFO first):
#   NCCL_SOCKET_IFNAME=ib0,eth0  interface for bootstrap/socket traffic
#   NCCL_IB_HCA=mlx5             InfiniBand adapters to use
# One BLAS thread per process: 8 ranks per node would otherwise oversubscribe the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Tokenizers' thread pool does not survive the fork of data workers.
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
# Compute nodes usually have no internet: read models only from the given folders.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
