"""A teacher writes responses for a prompts JSONL, resumably (``torchrun --nproc-per-node N
tools/generate_teacher_data.py --model ... --prompts ... --output ... --tp T --pp P``). The logic is in
megatron_tsdkd/commands/teacher_data.py; run with ``--help`` for the options."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tsdkd.commands.teacher_data import main  # noqa: E402

if __name__ == "__main__":
    main()
