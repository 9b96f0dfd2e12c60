from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def engine():
    """The real embedded engine (SmolLM2-135M-Instruct), loaded once per test session."""
    from dp_decoding.engines.embedded import EmbeddedEngine

    return EmbeddedEngine()


@pytest.fixture(scope="session")
def vengine():
    """The real vLLM engine (in-process ``vllm.LLM``), loaded once per test session: vLLM keeps
    process-wide state, so every vLLM test module shares this one instance."""
    from dp_decoding.engines import load_engine

    return load_engine("vllm")


def pytest_collection_modifyitems(config, items):
    """Run the vLLM tests last: in-process vLLM pins this process's torch threads (and
    replaces ``torch.set_num_threads``), which would slow every later embedded-engine test."""
    items.sort(key=lambda item: item.get_closest_marker("vllm") is not None)
