#!/usr/bin/env python3
"""A method study (same as the `tsdkd-study` console script), runnable from a checkout:

    python tools/study.py configs/study_demo.yaml --output outputs/study_demo
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_tsdkd.study.command import main  # noqa: E402

if __name__ == "__main__":
    main()
