"""The README's "Python API" block runs as written, on the tiny reference model (weights put where it looks)."""
import re

import torch


def readme_block(repo_root, heading: str) -> str:
    """The first ```python block under the README's ``## heading``."""
    text = (repo_root / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)
    assert len(section) == 2, f"README has no '## {heading}' section"
    body = section[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", body, re.S)
    assert m, f"no python block under '## {heading}'"
    return m.group(1)


def test_python_api_block_runs(repo_root, reference, tiny_checkpoint, tmp_path, monkeypatch):
    # The block's paths and names, satisfied offline: checkpoints/segclip.bin relative to the working directory and
    # the CLIP name "ViT-B/16" resolved through the cache folder.
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "segclip.bin").write_bytes(tiny_checkpoint.read_bytes())
    (tmp_path / "cache").mkdir()
    torch.save(reference["clip_state_dict"], tmp_path / "cache" / "ViT-B-16.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEGCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SEGCLIP_OFFLINE", "1")
    # What the block takes as given: a batch of normalised images and tokenised captions.
    ns = {"images": reference["images"], "input_ids": reference["train_text"]["input_ids"]}
    exec(compile(readme_block(repo_root, "Python API"), "README.md (Python API)", "exec"), ns)

    cfg = reference["config"]
    B, G, D = 2, cfg["num_centers"], cfg["embed_dim"]
    L = (cfg["image_resolution"] // cfg["patch_size"]) ** 2
    out = ns["out"]
    assert out.image_embed.shape == (B, D) and out.group_embeds.shape == (B, G, D)
    assert out.soft_attn.shape == out.hard_attn.shape == (B, G, L)
    assert torch.equal(out.hard_attn.sum(1), torch.ones(B, L))          # every patch picks exactly one center
    assert ns["text"].shape == (1, D)
    assert set(ns["losses"]) == {"contrastive", "mae", "total"} and torch.isfinite(ns["losses"]["total"])
    # the model built from CLIP carries the CLIP tensors it was given
    torch.testing.assert_close(ns["model"].clip.token_embedding.weight,
                               reference["clip_state_dict"]["token_embedding.weight"])
