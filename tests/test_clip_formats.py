"""CLIP weights from every format, checked against the library that defines each format (its own image and text
embeddings), and TorchScript archives read without running their code (design.md §9)."""
import os
import re
from typing import Tuple

import pytest
import torch

from modules.checkpoint import (CheckpointError, load_clip, load_clip_state_dict, load_clip_weights,
                                load_state_dict_file)
from modules.clip import CLIP
from modules.modeling import SegCLIP
from modules.tokenization_clip import tokenize

EMBED = dict(atol=1e-5, rtol=0)
TEXTS = ["a photo of a cat.", "a diagram", "two dogs playing in the snow"]


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (no LayerNorm left at 1 / 0, no zero bias), so every tensor's mapping matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _check(ours: CLIP, image_fn, text_fn, size: int):
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), image_fn(images), **EMBED)
        torch.testing.assert_close(ours.encode_text(tokens), text_fn(tokens), **EMBED)


# ---------------------------------------------------------------------------------------------- OpenAI TorchScript
@pytest.fixture(scope="module")
def torchscript_clip(reference, tmp_path_factory):
    """A tiny OpenAI CLIP (the clip package's own code) traced and saved as TorchScript, as ViT-B-16.pt is."""
    clip = pytest.importorskip("clip")
    from clip.model import build_model
    oracle = build_model(dict(reference["clip_state_dict"])).float().eval()
    tokens = clip.tokenize(TEXTS)
    traced = torch.jit.trace_module(oracle, {"encode_text": tokens, "encode_image": reference["images"]})
    path = tmp_path_factory.mktemp("ts") / "ViT-tiny.pt"
    torch.jit.save(traced, str(path))
    return path, oracle


def test_torchscript_read_without_jit(torchscript_clip, monkeypatch):
    path, oracle = torchscript_clip
    expected = torch.jit.load(str(path)).state_dict()

    def forbidden(*a, **k):
        raise AssertionError("torch.jit.load must not be used")
    monkeypatch.setattr(torch.jit, "load", forbidden)
    sd = load_state_dict_file(path)
    assert set(sd) == set(expected) - {"input_resolution", "context_length", "vocab_size"}
    for k, v in sd.items():
        assert v.dtype == expected[k].dtype and torch.equal(v, expected[k]), k
    model = load_clip(str(path))
    _check(model, oracle.encode_image, oracle.encode_text, 112)
    # and SegCLIP initialised from it (main_task_align.py --pretrained_clip_name)
    segclip = SegCLIP.from_clip(load_clip_state_dict(str(path)), first_stage_layer=10).eval()
    with torch.no_grad():
        torch.testing.assert_close(segclip.encode_text(tokenize(TEXTS)), oracle.encode_text(tokenize(TEXTS)), **EMBED)


class _Marker(torch.nn.Module):
    """A scripted module whose TorchScript __setstate__ creates and writes a file when the archive is loaded."""

    def __init__(self, path: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.path = path

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return (self.weight, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        written = torch.from_file(state[1], True, 4, dtype=torch.uint8)
        written.fill_(65)
        self.weight = state[0] + written[:1].float() * 0.0   # keeps the write alive through dead-code elimination
        self.path = state[1]
        self.training = state[2]

    def forward(self, x):
        return x * self.weight


class _Host(torch.nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.marker = _Marker(path)

    def forward(self, x):
        return self.marker(self.lin(x))


def test_malicious_torchscript_never_runs(tmp_path):
    target = tmp_path / "pwned.txt"
    archive = tmp_path / "evil.pt"
    torch.jit.save(torch.jit.script(_Host(str(target))), str(archive))
    assert not target.exists()
    torch.jit.load(str(archive))              # the archive does run code under torch.jit.load ...
    assert target.read_bytes() == b"AAAA"
    target.unlink()
    for load in (load_state_dict_file, load_clip_state_dict):   # ... and never under our readers
        with pytest.raises(CheckpointError, match="own __setstate__ code, which this reader never runs"):
            load(archive)
        assert not target.exists()


def test_torchscript_with_foreign_globals_is_refused(tmp_path):
    """Anything in data.pkl beyond tensors, containers and TorchScript records is refused, not imported."""
    import io
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo never",))
    buf = io.BytesIO()
    pickle.dump({"x": Evil()}, buf, protocol=2)
    path = tmp_path / "foreign.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("foreign/data.pkl", buf.getvalue())
        zf.writestr("foreign/constants.pkl", pickle.dumps(()))
    with pytest.raises(CheckpointError, match=r"refers to (posix|os)\.system"):
        load_state_dict_file(path)


# ---------------------------------------------------------------------------------------------- open_clip
@pytest.fixture(scope="module", params=[True, False], ids=["quickgelu", "gelu"])
def open_clip_model(request):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    model = open_clip.model.CLIP(
        embed_dim=32, quick_gelu=request.param,
        vision_cfg=CLIPVisionCfg(layers=3, width=128, patch_size=16, image_size=64, head_width=64),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2))
    return _perturb(model), ("quick_gelu" if request.param else "gelu")


def test_open_clip_checkpoint(open_clip_model, tmp_path):
    oc, act = open_clip_model
    # the file open_clip's training writes: {'epoch', 'name', 'state_dict' with DDP's 'module.' prefix, ...}
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "tiny", "state_dict": {"module." + k: v for k, v in oc.state_dict().items()}},
               path)
    ours = load_clip(str(path), activation=act)
    _check(ours, oc.encode_image, oc.encode_text, 64)
    if act == "gelu":   # QuickGELU assumed when the file does not say: the embeddings then differ
        with torch.no_grad():
            assert (load_clip(str(path)).encode_image(torch.ones(1, 3, 64, 64))
                    - oc.encode_image(torch.ones(1, 3, 64, 64))).abs().max() > 1e-4


def test_open_clip_safetensors(open_clip_model, tmp_path):
    from safetensors.torch import save_file
    oc, act = open_clip_model
    path = tmp_path / "open_clip_model.safetensors"      # the file open_clip's hub models ship
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(path))
    _check(load_clip(str(path), activation=act), oc.encode_image, oc.encode_text, 64)


# ---------------------------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def hf_model(request):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=1, max_position_embeddings=77, hidden_act=request.param),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
                           image_size=64, patch_size=16, hidden_act=request.param),
        projection_dim=32)
    return _perturb(transformers.CLIPModel(cfg)), request.param


def _hf_fns(hf):
    def image(x):
        out = hf.get_image_features(pixel_values=x)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def text(t):
        out = hf.get_text_features(input_ids=t)
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    return image, text


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_transformers_folder(hf_model, weights_file, tmp_path):
    hf, act = hf_model
    folder = tmp_path / "clip-tiny"
    hf.save_pretrained(str(folder))          # config.json + model.safetensors
    if weights_file == "pytorch_model.bin":  # the older layout of the same folder
        (folder / "model.safetensors").unlink()
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    weights = load_clip_weights(str(folder))
    assert weights.activation == act and weights.layout == "transformers"
    _check(load_clip(str(folder)), *_hf_fns(hf), 64)
    if act == "quick_gelu":   # SegCLIP initialised from it (main_task_align.py --pretrained_clip_name)
        segclip = SegCLIP.from_clip(load_clip_state_dict(str(folder)), first_stage_layer=2).eval()
        with torch.no_grad():
            torch.testing.assert_close(segclip.encode_text(tokenize(TEXTS)), _hf_fns(hf)[1](tokenize(TEXTS)), **EMBED)
    else:                     # SegCLIP's towers are QuickGELU: refused, not silently wrong
        with pytest.raises(CheckpointError, match="gelu activation; SegCLIP is built on"):
            load_clip_state_dict(str(folder))


def test_transformers_safetensors_file(hf_model, tmp_path):
    """A bare model.safetensors in transformers' layout converts too (activation then from the caller)."""
    hf, act = hf_model
    hf.save_pretrained(str(tmp_path / "f"))
    _check(load_clip(str(tmp_path / "f" / "model.safetensors"), activation=act), *_hf_fns(hf), 64)


def test_openai_state_dict_and_safetensors(reference, tmp_path):
    from safetensors.torch import save_file
    clip = pytest.importorskip("clip")
    oracle = clip.model.build_model(dict(reference["clip_state_dict"])).float().eval()
    sd = oracle.state_dict()
    torch.save(sd, tmp_path / "clip.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "clip.safetensors"))
    for name in ("clip.pt", "clip.safetensors"):
        _check(load_clip(str(tmp_path / name)), oracle.encode_image, oracle.encode_text, 112)


def test_bad_clip_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="folder without config.json"):
        load_clip(str(tmp_path / "empty"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "clip", "text_config": {}, "vision_config": {}}')
    with pytest.raises(CheckpointError, match="needs model.safetensors or pytorch_model.bin"):
        load_clip(str(tmp_path / "hf"))
    (tmp_path / "bad.safetensors").write_bytes((20).to_bytes(8, "little") + b"{not json")
    with pytest.raises(CheckpointError, match="not a readable .safetensors file"):
        load_clip(str(tmp_path / "bad.safetensors"))


@pytest.mark.parametrize("config, message", [
    ('[1, 2]', "expected a JSON object of settings, got [1, 2]"),
    ('{"model_type": ["clip"]}', "model_type must be a string"),
    ('{"text_config": "base"}', "text_config must be an object"),
    ('{"vision_config": {"hidden_size": "768"}}', 'vision_config.hidden_size must be an integer above 0, got "768"'),
    ('{"vision_config": {"hidden_size": 768, "num_attention_heads": 0}}', "num_attention_heads must be an integer above 0"),
    ('{"text_config": {"hidden_size": true}}', "text_config.hidden_size must be an integer above 0, got true"),
    ('{"text_config": {"layer_norm_eps": "1e-5"}}', "text_config.layer_norm_eps must be a number"),
    ('{"vision_config": {"hidden_act": ["gelu"]}}', "vision_config.hidden_act must be a string"),
    ('[' * 100_000 + ']' * 100_000, "not a readable JSON config"),
])
def test_badly_typed_hf_config_is_one_line(config, message, tmp_path, capsys):
    """A transformers folder whose config.json has a field of the wrong type (written by hand, damaged): one line
    naming the field, from every tool that reads CLIP weights, before any weights are read."""
    import main_seg_vis
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    (folder / "model.safetensors").write_bytes(b"")      # never reached
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_clip_weights(str(folder))
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    assert main_seg_vis.main(["--method", "sclip", "--pretrained_clip_name", str(folder), "--classes", "cat",
                              "--input", str(tmp_path / "x.png"), "--output_dir", str(tmp_path / "out"),
                              "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_segclip_checkpoint_as_clip(reference, tmp_path):
    """The CLIP inside a SegCLIP checkpoint (--method clip|sclip on SegCLIP's backbone): the key map in reverse."""
    from modules.state_dict import clip_to_segclip_state_dict
    clip_sd = {k: v for k, v in reference["clip_state_dict"].items()}
    segclip = SegCLIP.from_clip(clip_sd, first_stage_layer=10)
    torch.save(segclip.state_dict(), tmp_path / "segclip.bin")
    weights = load_clip_weights(str(tmp_path / "segclip.bin"))
    assert weights.layout == "segclip" and set(weights.state_dict) == set(clip_sd)
    for k, v in weights.state_dict.items():
        assert torch.equal(v, clip_sd[k]), k
    assert set(clip_to_segclip_state_dict(weights.state_dict, 10)) <= set(segclip.state_dict())


# ---------------------------------------------------------------------------------------------- zip bombs
def _rezip(src, dst, replace):
    """Copy the zip ``src`` to ``dst``, the members for which ``replace(name)`` gives a size replaced by that many
    zero bytes, deflated (a zip bomb: megabytes of zeros pack into kilobytes)."""
    import zipfile
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            size = replace(info.filename)
            if size is None:
                zout.writestr(info, zin.read(info.filename))
                continue
            packed = zipfile.ZipInfo(info.filename)
            packed.compress_type = zipfile.ZIP_DEFLATED
            with zout.open(packed, "w", force_zip64=True) as f:
                chunk = bytes(1 << 20)
                for _ in range(size >> 20):
                    f.write(chunk)


@pytest.mark.parametrize("member", ["data/0", "code/", "data.pkl"])
def test_torchscript_zip_bomb_is_refused_before_decompressing(member, tmp_path):
    """Poor case of issue 21. Before: every member was read whole (a storage of 4 tensor values that unpacks to
    256 MB was read in full: 3-4 GB for a bigger bomb)."""
    import tracemalloc
    import zipfile
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(plain))
    with zipfile.ZipFile(plain) as zf:
        # code/: the module's declaration (its file name is mangled when Linear was scripted before in this process)
        target = next(n for n in zf.namelist() if n.split("/", 1)[1] == member
                      or member == "code/" and n.split("/", 1)[1].startswith(member) and n.endswith(".py"))
    bomb = tmp_path / "bomb.pt"
    _rezip(plain, bomb, lambda name: (256 << 20) if name == target else None)
    assert bomb.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=f"{target} in the archive unpacks to 268,435,456 bytes from "
                                                  r"[\d,]+ \(at most [\d,]+ belong there\): a zip bomb"):
            load_state_dict_file(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{peak:,} bytes allocated"
