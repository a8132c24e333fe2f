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


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """The built-in model goes to a per-session cache, never the user's."""
    monkeypatch.setenv("PROMOE_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "promoe-cache"))
