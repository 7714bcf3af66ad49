import os
import sys
import warnings

# Tests are CPU-only and deterministic; keep every BLAS to one thread so 4 processes share 2 cores politely.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
