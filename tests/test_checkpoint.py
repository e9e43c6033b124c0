"""Loading SegCLIP and CLIP weights: key maps, inference of sizes, TorchScript archives, clear errors."""
import pickle

import pytest
import torch

from modules.checkpoint import CheckpointError, load_clip_state_dict, load_segclip, load_state_dict_file
from modules.state_dict import clip_to_segclip_key
from modules.modeling import SegCLIP, SegCLIPConfig


def test_full_size_model_has_released_keys_and_shapes(vitb16_keys, tmp_path):
    model = SegCLIP(SegCLIPConfig())
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == vitb16_keys["keys"]
    assert sum(v.numel() for v in model.state_dict().values()) == vitb16_keys["num_parameters"]
    no_mae = SegCLIP(SegCLIPConfig(use_vision_mae_recon=False))
    assert sum(v.numel() for v in no_mae.state_dict().values()) == vitb16_keys["num_parameters_without_mae_decoder"]
    # saved and reloaded through the loader: nothing missing or unexpected, sizes inferred
    path = tmp_path / "segclip.bin"
    torch.save(model.state_dict(), path)
    loaded = load_segclip(path)
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_clip_key_map_matches_reference(vitb16_keys, reference):
    for src, dst in vitb16_keys["clip_vitb16_to_segclip_keys"].items():
        assert clip_to_segclip_key(src, 10) == dst
    for src, dst in reference["clip_to_segclip_keys"].items():
        assert clip_to_segclip_key(src, 10) == dst


def test_from_clip_copies_inherited_weights(reference):
    model = SegCLIP.from_clip(reference["clip_state_dict"], first_stage_layer=10)
    sd, ref = model.state_dict(), reference["segclip_state_dict"]
    assert set(sd) == set(ref)
    for dst in reference["clip_to_segclip_keys"].values():
        assert torch.equal(sd[dst], ref[dst]), dst
    # new modules are freshly initialised (design.md §3)
    assert model.clip.visual.transformer.reconstruct_layer2.rec_proj_a.a_fc.bias.abs().sum() == 0
    center = model.clip.visual.transformer.semantic_layer2.semantic_center
    assert 0.01 < center.std() < 0.03   # trunc-normal, std 0.02


def test_from_clip_accepts_openai_extra_keys(reference, tmp_path):
    sd = dict(reference["clip_state_dict"])
    sd.update(input_resolution=torch.tensor(112), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "clip.pt"
    torch.save(sd, path)
    model = SegCLIP.from_clip(load_clip_state_dict(str(path)), first_stage_layer=8, use_vision_mae_recon=False)
    assert len(model.clip.visual.transformer.layers0) == 8 and len(model.clip.visual.transformer.layers2) == 4
    assert not model.has_mae_decoder


def test_torchscript_clip_archive(reference, tmp_path):
    """A tiny OpenAI CLIP (genuine code from the clip package), traced and saved as TorchScript like ViT-B-16.pt."""
    clip = pytest.importorskip("clip")
    from clip.model import build_model
    oracle = build_model(dict(reference["clip_state_dict"])).float().eval()
    tokens = clip.tokenize(["a photo of a cat.", "a diagram", "two dogs playing in the snow"])
    traced = torch.jit.trace_module(oracle, {"encode_text": tokens, "encode_image": reference["images"]})
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(traced, str(path))
    model = SegCLIP.from_clip(load_clip_state_dict(str(path)), first_stage_layer=10).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), oracle.encode_text(tokens), atol=1e-5, rtol=1e-4)


def test_checkpoint_without_mae_decoder_loads(reference, tmp_path):
    sd = {k: v for k, v in reference["segclip_state_dict"].items() if not k.startswith("vis_mae_decoder.")}
    path = tmp_path / "no_mae.bin"
    torch.save(sd, path)
    model = load_segclip(path)
    assert not model.has_mae_decoder and not model.training
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(reference["images"]).image_embed,
                                   reference["eval"]["res1x"]["image_embed"], atol=1e-5, rtol=1e-4)


def test_missing_and_misshaped_keys_are_named(reference, tmp_path):
    sd = dict(reference["segclip_state_dict"])
    del sd["clip.visual.transformer.layers2.1.ln_2.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing key: clip\.visual\.transformer\.layers2\.1\.ln_2\.bias"):
        SegCLIP.from_state_dict(sd)
    sd = dict(reference["segclip_state_dict"])
    sd["clip.visual.transformer.semantic_layer2.k_ln.weight"] = torch.zeros(65)
    with pytest.raises(CheckpointError, match=r"mis-shaped.*k_ln\.weight"):
        SegCLIP.from_state_dict(sd)
    sd = dict(reference["segclip_state_dict"])
    sd["clip.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 unexpected key: clip\.extra\.weight"):
        SegCLIP.from_state_dict(sd)


def test_not_a_state_dict(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"a": Evil()}, f)
    with pytest.raises(CheckpointError, match="is a pickle that is not a weights-only PyTorch checkpoint") as e:
        load_state_dict_file(path)
    assert "weights_only" not in str(e.value)
    torch.save([1, 2, 3], tmp_path / "list.bin")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_state_dict_file(tmp_path / "list.bin")
    torch.save({"clip.x": torch.zeros(1)}, tmp_path / "other.bin")
    with pytest.raises(CheckpointError, match="not a SegCLIP/CLIP ViT state dict"):
        load_segclip(tmp_path / "other.bin")
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict_file(tmp_path / "nope.bin")


def test_wrapped_and_ddp_prefixed_checkpoints(reference, tmp_path):
    sd = reference["segclip_state_dict"]
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "wrapped.bin")
    assert set(load_state_dict_file(tmp_path / "wrapped.bin")) == set(sd)


def test_bad_inputs(tiny_model):
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        tiny_model.encode_image(torch.zeros(1, 3, 100, 112))
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        tiny_model.encode_image(torch.zeros(3, 112, 112))
    with pytest.raises(ValueError, match="token ids must lie in"):
        tiny_model.encode_text(torch.tensor([[49406, 50000, 49407]]))
    with pytest.raises(ValueError, match="exceed the context length"):
        tiny_model.encode_text(torch.ones(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="first_stage_layer"):
        SegCLIP(SegCLIPConfig(vision_layers=4, first_stage_layer=4))
