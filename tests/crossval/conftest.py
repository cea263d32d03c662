"""Make the shared test helpers (``tests/zoo.py``, ``tests/curvature_oracles.py``) importable."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
