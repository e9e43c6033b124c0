"""Shared test fixtures.

The reference fixtures live in ``../shared/reference`` next to the checkout; set ``SEGCLIP_SHARED`` to point
elsewhere (e.g. when the checkout lives in another folder).
"""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SHARED_DIR = Path(os.environ.get("SEGCLIP_SHARED", REPO_ROOT.parent / "shared")).resolve()
REFERENCE_PT = SHARED_DIR / "reference" / "segclip_reference_public.pt"
VITB16_JSON = SHARED_DIR / "reference" / "segclip_vitb16_state_dict.json"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def reference():
    """The recorded outputs of the 2022 code on a tiny model (SPEC §11)."""
    if not REFERENCE_PT.exists():
        pytest.fail(f"reference fixture not found at {REFERENCE_PT}; set SEGCLIP_SHARED to the shared/ folder")
    return torch.load(REFERENCE_PT, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def vitb16_keys():
    import json
    with open(VITB16_JSON) as f:
        return json.load(f)


@pytest.fixture()
def tiny_model(reference):
    """The tiny SegCLIP of the reference fixture, in eval mode (fresh per test)."""
    from modules.modeling import SegCLIP
    return SegCLIP.from_state_dict(reference["segclip_state_dict"]).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(reference, tmp_path_factory) -> Path:
    """The tiny reference SegCLIP saved as a plain state-dict file, as the released ``segclip.bin`` is."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny_segclip.bin"
    torch.save(reference["segclip_state_dict"], path)
    return path
