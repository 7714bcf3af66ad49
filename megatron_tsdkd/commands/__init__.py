"""The command-line programs, one module each: train, eval, convert, plan, teacher_data (dispatched by cli.py)."""
