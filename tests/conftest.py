"""Every test runs offline against an empty hub cache: nothing may come from a download or a cache."""

import os
import sys
import tempfile
from pathlib import Path

_HOME = tempfile.mkdtemp(prefix="text4seg-tests-")
os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=f"{_HOME}/hf", TEXT4SEG_CACHE=f"{_HOME}/text4seg",
                  TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
sys.path.insert(0, str(Path(__file__).parent))
