"""Shared fixtures: the real EPIC-100 annotations (skipped when ../shared is absent) and one tiny synthetic dataset."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_ANNOTATIONS = REPO.parent / "shared" / "epic100-annotations"


@pytest.fixture(scope="session")
def shared_annotations() -> Path:
    """The real EPIC-100 annotation folder that developers and CI have beside the repo."""
    if not (SHARED_ANNOTATIONS / "EPIC_100_validation.csv").is_file():
        pytest.skip(f"real EPIC-100 annotations not found at {SHARED_ANNOTATIONS} (only developers and CI have ../shared)")
    return SHARED_ANNOTATIONS


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """A tiny synthetic EPIC-layout dataset (6 short videos, ~1 s to generate), generated once per test session."""
    from epicfeat.data.synthetic import SyntheticSpec, generate_synthetic_dataset

    return generate_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), seed=0, spec=SyntheticSpec.tiny())


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning OpenMP threads made
    training runs up to 20x slower (1.4 s vs 25 s measured). Use with ``pytest.mark.usefixtures``; the previous
    setting comes back after each test."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
