"""DINO and DINOv2 (modules/vfm.py, design.md §14): features against the outputs of the official code, the keys CASS
reads, the released architectures, and loading them safely - by file, by name from the cache, downloaded from a
server on 127.0.0.1, offline, and refusing bad files with one line each.

Fixture ``tests/fixtures/proxyclip_reference.pt`` (written from ``proxyclip_reference_public.pt``, recorded with
ProxyCLIP's code and the official DINO / DINOv2 model code; see tests/test_proxyclip_parity.py): this module reads
``dino_state_dict`` / ``dinov2_state_dict`` (tiny random models in the official key layouts, float16 values),
``config`` (the normalisation constants), ``encode.images_224_u8`` and ``pipeline.input_u8`` (its left 336×336
window is the recorded 336 input), and the recorded features ``encode.dino_feats_224_c32`` (first 32 of 128
channels), ``dino_feats_336_c8`` (first 8), ``dinov2_feats_224_c32``, ``dinov2_feats_336_c32``.
"""
import math
import os
import zipfile

import pytest
import torch

from common import download
from common.download import VFM_URLS, DownloadError
from modules.checkpoint import load_vfm
from modules.layers import resize_positions
from modules.state_dict import CheckpointError
from modules.vfm import VFM_CONFIGS, VisionTransformerVFM, config_from_state_dict, meta_state_dict
from tests.conftest import FIXTURES
from tests.test_download import _free_port_url, server  # noqa: F401 - the HTTP server fixture

PROXYCLIP_PT = FIXTURES / "proxyclip_reference.pt"
FEATURES = dict(atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def ref():
    return torch.load(PROXYCLIP_PT, map_location="cpu", weights_only=True)


def imagenet_input(ref, u8):
    """8-bit RGB -> the VFM input ProxyCLIP computes: preprocessed with its data preprocessor's constants, then
    un-normalised with CLIP's and normalised with ImageNet's (float32, in that order)."""
    c = ref["config"]
    v = lambda key: torch.tensor(c[key]).view(1, 3, 1, 1)  # noqa: E731
    x = (u8.float() - v("preprocess_mean")) / v("preprocess_std")
    return ((x * v("clip_std") + v("clip_mean")) - v("vfm_mean")) / v("vfm_std")


@pytest.fixture(scope="module")
def dino(ref):
    return VisionTransformerVFM.from_state_dict(ref["dino_state_dict"]).eval()


@pytest.fixture(scope="module")
def dinov2(ref):
    return VisionTransformerVFM.from_state_dict(ref["dinov2_state_dict"]).eval()


def test_sizes_from_the_tensors(ref, dino, dinov2):
    assert (dino.patch_size, dino.width, dino.heads, dino.num_registers, len(dino.blocks)) == (8, 128, 2, 0, 4)
    assert (dinov2.patch_size, dinov2.width, dinov2.heads, dinov2.num_registers, len(dinov2.blocks)) == \
        (14, 128, 2, 4, 4)
    assert dino.config.family == "dino" and dinov2.config.family == "dinov2"
    assert (dino.config.grid, dinov2.config.grid, dino.config.mlp_hidden) == (28, 16, 512)
    for model, sd in ((dino, ref["dino_state_dict"]), (dinov2, ref["dinov2_state_dict"])):
        own = model.state_dict()
        assert set(own) == set(sd)
        assert all(torch.equal(own[k], v.float()) for k, v in sd.items())
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_dino_features(ref, dino):
    enc = ref["encode"]
    with torch.no_grad():
        f224 = dino.features(imagenet_input(ref, enc["images_224_u8"]))
        f336 = dino.features(imagenet_input(ref, ref["pipeline"]["input_u8"][..., :336]))   # table 28 -> 42
    assert f224.shape == (2, 128, 28, 28) and f336.shape == (1, 128, 42, 42)
    torch.testing.assert_close(f224[:, :32], enc["dino_feats_224_c32"], **FEATURES)
    torch.testing.assert_close(f336[:, :8], enc["dino_feats_336_c8"], **FEATURES)


def test_dinov2_features(ref, dinov2):
    enc = ref["encode"]
    with torch.no_grad():
        f224 = dinov2.features(imagenet_input(ref, enc["images_224_u8"]))
        f336 = dinov2.features(imagenet_input(ref, ref["pipeline"]["input_u8"][..., :336]))   # table 16 -> 24
    assert f224.shape == (2, 128, 16, 16) and f336.shape == (1, 128, 24, 24)
    torch.testing.assert_close(f224[:, :32], enc["dinov2_feats_224_c32"], **FEATURES)
    torch.testing.assert_close(f336[:, :32], enc["dinov2_feats_336_c32"], **FEATURES)


def test_positional_resize_rules_matter(dino, dinov2):
    """Each family's own rule: the other rule moves the table far beyond the tolerance (and timm's - size=,
    antialiased - is DINOv2-reg's, so timm is not DINO at 336 px)."""
    pos = dino.pos_embed[0].detach()
    dino_rule = resize_positions(pos, 42, 42)
    assert (dino_rule - resize_positions(pos, 42, 42, offset=0.0, antialias=True)).abs().max() > 1e-2
    pos2 = dinov2.pos_embed[0].detach()
    reg_rule = resize_positions(pos2, 24, 24, offset=0.0, antialias=True)
    assert (reg_rule - resize_positions(pos2, 24, 24)).abs().max() > 1e-2
    assert torch.equal(dinov2.positions(24, 24), reg_rule) and torch.equal(dino.positions(42, 42), dino_rule)
    assert torch.equal(resize_positions(pos, 28, 28), pos)   # the stored grid: the table itself


@pytest.mark.parametrize("which", ["dino", "dinov2"])
def test_last_block_keys_and_features_equal_timm(ref, which, dino, dinov2):
    """At the stored grid (no positional resize) timm's ViT is the same model: its last block's qkv output (a
    forward hook, as CASS reads DINO's keys) gives the keys, class token first, DINOv2's registers left out
    (timm's fused attention rounds unlike DINO's written-out one: equal to float noise, ~2e-6)."""
    vit = pytest.importorskip("timm.models.vision_transformer")
    from functools import partial
    model = dino if which == "dino" else dinov2
    sd = {k: v.float() for k, v in ref[f"{which}_state_dict"].items()}
    kw = dict(img_size=224, patch_size=model.patch_size, embed_dim=128, depth=4, num_heads=2, qkv_bias=True,
              num_classes=0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    if which == "dinov2":   # timm keeps the class position inside its class token
        kw.update(reg_tokens=4, no_embed_class=True, init_values=1.0)
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
        sd["reg_token"] = sd.pop("register_tokens")
        sd.pop("mask_token")
    other = vit.VisionTransformer(**kw).eval()
    other.load_state_dict(sd)
    seen = {}
    other.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: seen.setdefault("qkv", o))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = other.forward_features(x)
        keys = model.last_block_keys(x)
        feats = model.features(x)
    k = seen["qkv"].unflatten(-1, (3, 2, 64))[:, :, 1].transpose(1, 2)          # [B, heads, 1+R+N, 64]
    R = model.num_registers
    n = (224 // model.patch_size) ** 2
    assert keys.shape == (2, 2, 1 + n, 64)
    torch.testing.assert_close(keys, torch.cat([k[:, :, :1], k[:, :, 1 + R:]], dim=2), **FEATURES)
    torch.testing.assert_close(feats.flatten(2).transpose(1, 2), tokens[:, 1 + R:], **FEATURES)


def test_released_architectures():
    """The twelve names: their official URLs, and the models the official files hold (parameter counts as
    published: DINO ViT-S 21M, ViT-B 85M; DINOv2 21M, 86M, 300M, 1,100M)."""
    assert set(VFM_CONFIGS) == set(VFM_URLS) and len(VFM_URLS) == 12
    for name, url in VFM_URLS.items():
        assert url.startswith("https://dl.fbaipublicfiles.com/dino")
        assert url.endswith(("_reg4_pretrain.pth" if name.endswith("_reg") else "_pretrain.pth"))
    assert VFM_URLS["dino_vitb8"].endswith("/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth")
    assert VFM_URLS["dinov2_vitb14_reg"].endswith("/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth")
    millions = {name: sum(math.prod(v.shape) for v in meta_state_dict(cfg).values()) / 1e6
                for name, cfg in VFM_CONFIGS.items()}
    for name, expected in dict(dino_vits8=21, dino_vitb8=85, dinov2_vits14=21, dinov2_vitb14=86, dinov2_vitl14=300,
                               dinov2_vitg14=1100).items():
        assert abs(millions[name] - expected) / expected < 0.1, (name, millions[name])   # rounded README figures
    b8 = meta_state_dict(VFM_CONFIGS["dino_vitb8"])
    assert len(b8) == 150 and b8["pos_embed"].shape == (1, 785, 768)
    g = meta_state_dict(VFM_CONFIGS["dinov2_vitg14_reg"])
    assert g["blocks.39.mlp.w12.weight"].shape == (8192, 1536) and g["register_tokens"].shape == (1, 4, 1536)
    assert g["pos_embed"].shape == (1, 1 + 37 * 37, 1536) and VFM_CONFIGS["dinov2_vitg14"].heads == 24
    # every size is read back from the tensors
    assert all(config_from_state_dict(meta_state_dict(cfg)) == cfg for cfg in VFM_CONFIGS.values())


# ------------------------------------------------------------------------------------------------ loading
@pytest.fixture()
def files(ref, tmp_path):
    """The tiny DINO and DINOv2 as plain state-dict files, as the official ``*_pretrain.pth`` are."""
    out = {}
    for which in ("dino", "dinov2"):
        out[which] = tmp_path / f"tiny_{which}.pth"
        torch.save(ref[f"{which}_state_dict"], out[which])
    return out


def test_load_by_file(files, dino, dinov2):
    x = torch.randn(1, 3, 112, 168, generator=torch.Generator().manual_seed(1))
    for which, same in (("dino", dino), ("dinov2", dinov2)):
        model = load_vfm(str(files[which]))
        assert not model.training and model.config == same.config
        with torch.no_grad():
            assert torch.equal(model.features(x), same.features(x))


def test_load_by_name_from_the_cache(files, ref, tmp_path, monkeypatch):
    """A name is the official file in the cache, found there without any download; a file of another model under
    that name is refused."""
    monkeypatch.setenv("SEGCLIP_OFFLINE", "1")   # any download attempt would raise
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "dino_vitbase8_pretrain.pth").write_bytes(files["dino"].read_bytes())
    with pytest.raises(CheckpointError) as err:   # the tiny model is not the released ViT-B/8
        load_vfm("dino_vitb8", cache_dir=cache)
    assert ("holds a DINO ViT width 128, 4 blocks, patch 8, not dino_vitb8 (DINO ViT width 768, 12 blocks"
            in str(err.value))
    monkeypatch.setitem(VFM_CONFIGS, "dino_vitb8", config_from_state_dict(ref["dino_state_dict"]))
    model = load_vfm("dino_vitb8", cache_dir=cache)
    assert model.patch_size == 8 and model.width == 128
    monkeypatch.setenv("SEGCLIP_CACHE", str(cache))   # the cache of the environment, as --cache_dir's default
    assert load_vfm("dino_vitb8").width == 128


def test_offline_says_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCLIP_OFFLINE", "1")
    with pytest.raises(DownloadError) as err:
        load_vfm("dinov2_vitb14_reg", cache_dir=tmp_path / "c")
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and "SEGCLIP_OFFLINE" in msg
    assert str(tmp_path / "c" / "dinov2_vitb14_reg4_pretrain.pth") in msg and VFM_URLS["dinov2_vitb14_reg"] in msg
    monkeypatch.delenv("SEGCLIP_OFFLINE")   # no network: nothing listens at the URL
    url = _free_port_url() + "/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"
    monkeypatch.setitem(download.VFM_URLS, "dinov2_vitb14_reg", url)
    with pytest.raises(DownloadError) as err:
        load_vfm("dinov2_vitb14_reg", cache_dir=tmp_path / "c")
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and "could not download" in msg and url in msg and "curl -L -o" in msg
    assert str(tmp_path / "c" / "dinov2_vitb14_reg4_pretrain.pth") in msg and os.listdir(tmp_path / "c") == []


def test_download_checks_the_tensors(server, files, ref, tmp_path, monkeypatch):  # noqa: F811
    base, handler = server
    handler.routes["/dino/dino_vitbase8_pretrain.pth"] = (files["dino"].read_bytes(), "ok")
    handler.routes["/wrong/dino_vitbase8_pretrain.pth"] = (files["dinov2"].read_bytes(), "ok")
    handler.routes["/html/dino_vitbase8_pretrain.pth"] = (b"<html>sign in</html>", "ok")
    monkeypatch.setitem(VFM_CONFIGS, "dino_vitb8", config_from_state_dict(ref["dino_state_dict"]))
    monkeypatch.setitem(download.VFM_URLS, "dino_vitb8", f"{base}/dino/dino_vitbase8_pretrain.pth")
    model = load_vfm("dino_vitb8", cache_dir=tmp_path / "a")
    assert model.width == 128 and os.listdir(tmp_path / "a") == ["dino_vitbase8_pretrain.pth"]
    load_vfm("dino_vitb8", cache_dir=tmp_path / "a")   # cached: no second request
    assert handler.requests == ["/dino/dino_vitbase8_pretrain.pth"]
    for route, why in (("wrong", "expected the tensors of the released dino_vitb8"),
                       ("html", "not a loadable state dict")):
        monkeypatch.setitem(download.VFM_URLS, "dino_vitb8", f"{base}/{route}/dino_vitbase8_pretrain.pth")
        with pytest.raises(DownloadError) as err:
            load_vfm("dino_vitb8", cache_dir=tmp_path / route)
        assert why in str(err.value) and "it was removed" in str(err.value) and len(str(err.value).splitlines()) == 1
        assert os.listdir(tmp_path / route) == []


def _bad_files(ref, tmp_path):
    sd = {k: v.float() for k, v in ref["dino_state_dict"].items()}
    out = {}
    out["text"] = tmp_path / "notes.pth"
    out["text"].write_text("these are not weights\n")
    good = tmp_path / "good.pth"
    torch.save(sd, good)
    out["truncated"] = tmp_path / "truncated.pth"
    out["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out["nan"] = tmp_path / "nan.pth"
    torch.save({**sd, "blocks.2.mlp.fc1.weight": torch.full_like(sd["blocks.2.mlp.fc1.weight"], float("nan"))},
               out["nan"])
    out["clip"] = tmp_path / "clip.pt"
    torch.save({k: v for k, v in ref["visual_state_dict"].items()}, out["clip"])
    out["short"] = tmp_path / "short.pth"
    torch.save({k: v for k, v in sd.items() if k != "blocks.3.attn.proj.bias"}, out["short"])
    out["objects"] = tmp_path / "objects.pth"
    torch.save({"model": sd, "args": zipfile.ZipInfo("x")}, out["objects"])
    return out


@pytest.mark.parametrize("kind, says", [
    ("text", "is not a weights-only PyTorch checkpoint"),
    ("truncated", "is truncated"),
    ("nan", "tensor blocks.2.mlp.fc1.weight holds 65536 NaN"),
    ("clip", "not a DINO / DINOv2 state dict in the official layout: missing ['cls_token'"),
    ("short", "missing key: blocks.3.attn.proj.bias"),
    ("objects", "holds Python objects"),
])
def test_bad_files_one_line_each(ref, tmp_path, kind, says):
    path = _bad_files(ref, tmp_path)[kind]
    with pytest.raises(CheckpointError) as err:
        load_vfm(str(path))
    msg = str(err.value)
    assert says in msg and str(path) in msg and len(msg.splitlines()) == 1, msg


def test_missing_name_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file nor one of the known models dino_vits8"):
        load_vfm(str(tmp_path / "typo.pth"))
