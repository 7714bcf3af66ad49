"""Hugging Face <-> megatron-core checkpoint converter (``tsdkd-convert``); the logic is in
megatron_tsdkd/commands/convert.py. Run ``python tools/convert.py --help``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tsdkd.commands.convert import main  # noqa: E402

if __name__ == "__main__":
    main()
