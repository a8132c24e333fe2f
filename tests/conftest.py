import pytest
import torch

from .checkpoints import FAMILIES, write_checkpoint


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> folder of a tiny checkpoint of that family (made once per session)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: write_checkpoint(root / family, family) for family in FAMILIES}
