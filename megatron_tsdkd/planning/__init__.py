"""Everything decided before any process group exists: the inputs checked (inputs.py), the memory plans (device,
ZeRO, host) and the run plan (run_plan.py), the one frozen record of the facts derived from the config."""
