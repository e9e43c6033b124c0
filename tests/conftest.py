"""Shared test fixtures.

The recorded reference outputs live in ``tests/fixtures/`` (docs/design.md, "Reference fixtures").
"""
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
REFERENCE_PT = FIXTURES / "segclip_reference_public.pt"
SCLIP_REFERENCE_PT = FIXTURES / "sclip_reference_public.pt"
VITB16_JSON = FIXTURES / "segclip_vitb16_state_dict.json"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def reference():
    """The recorded outputs of the 2022 code on a tiny model (docs/design.md, "Reference fixtures")."""
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


@pytest.fixture(scope="session")
def clip_file(reference, tmp_path_factory) -> Path:
    """The SCLIP fixture's CLIP (224 px, 4 blocks) as a plain OpenAI-layout state-dict file (--method sclip/clip)."""
    sd = {k: v for k, v in reference["clip_state_dict"].items() if not k.startswith("visual.")}
    sd.update(torch.load(SCLIP_REFERENCE_PT, map_location="cpu", weights_only=True)["visual_state_dict"])
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(sd, path)
    return path
