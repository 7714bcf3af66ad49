#!/usr/bin/env python3
"""Per-rank GPU memory plan of a training config (same as the `tsdkd-plan` console script), runnable offline:

    python tools/plan.py --config configs/tsdkd_70b_to_7b.yaml --world-size 16 --gpu-memory-gib 80
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_tsdkd.commands.plan import main  # noqa: E402

if __name__ == "__main__":
    main()
