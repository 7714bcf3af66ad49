"""KPOD's offline, resumable preparation (``python tools/kpod_prepare.py --data ... --student ... --out ...``, or
``torchrun --nproc-per-node T tools/kpod_prepare.py ... --tp T``). The logic is in megatron_tsdkd/kpod/;
run with ``--help`` for the options."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tsdkd.kpod.command import main  # noqa: E402

if __name__ == "__main__":
    main()
