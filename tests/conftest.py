"""Skip GPU-only tests cleanly where there is no CUDA device (CI has none)."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count()
    no_gpu = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    no_multi = pytest.mark.skip(reason="needs two or more CUDA devices")
    for item in items:
        if "gpu" in item.keywords and gpus < 1:
            item.add_marker(no_gpu)
        if "multigpu" in item.keywords and gpus < 2:
            item.add_marker(no_multi)
