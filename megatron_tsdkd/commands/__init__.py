"""The command-line programs, one module each: train, eval, convert, plan, data, teacher_data, doctor (dispatched
by cli.py).

Imports of this project's heavier modules sit inside each program's functions, on purpose: the warning filters
(runtime/warnings.py ``install``) must be in place before megatron-core is imported (most of its notes come at
import), a usage error or ``--help`` answers without loading models' libraries (``tsdkd-eval --help``: 1.2 s; its
evaluation modules alone add 1.0 s, megatron-core 2 s more), and ``tsdkd-doctor`` must report even where torch
cannot load."""
