"""Every test runs offline against an empty hub cache: nothing may come from a download or a cache."""

import os
import sys
import tempfile
from pathlib import Path

_HOME = tempfile.mkdtemp(prefix="text4seg-tests-")
os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=f"{_HOME}/hf", TEXT4SEG_CACHE=f"{_HOME}/text4seg",
                  TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
if "PYTEST_XDIST_WORKER" in os.environ:  # one torch thread per worker: workers share the cores, not threads
    os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: a worker per core, up to four (each holds its own models and app)."""
    return min(4, os.cpu_count() or 1)
