import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # hubconf.py and an uninstalled checkout

import sd_zoo  # noqa: E402,F401  registers the models


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
