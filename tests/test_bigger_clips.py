"""Bigger CLIPs for the training-free methods (ViT-L/14 at 336 px, open_clip / MetaCLIP weights): every size read
from the weights. A tiny patch-14 CLIP at 336 px (a 24x24 grid, like ViT-L/14@336px) stands in for them: its plain
path is compared with OpenAI's `clip` package and open_clip, and every method of the harness runs on it."""
import pytest
import torch

from modules.checkpoint import load_clip
from modules.config import clip_config
from modules.tokenization_clip import tokenize
from seg_segmentation.dense import TrainingFreeSegmentor
from seg_segmentation.methods import METHODS, build_method
from tests.test_clip_formats import EMBED, TEXTS, _check, _perturb

NAMES = ['sky, wall, grass', 'cat, kitten', 'dog', 'car, truck']


@pytest.fixture(scope='module')
def oracle_l14():
    """OpenAI's own CLIP class at a tiny width with ViT-L/14@336px's patch and grid."""
    clip = pytest.importorskip('clip')
    model = clip.model.CLIP(embed_dim=32, image_resolution=336, vision_layers=4, vision_width=128,
                            vision_patch_size=14, context_length=77, vocab_size=49408, transformer_width=64,
                            transformer_heads=1, transformer_layers=2)
    return _perturb(model.float(), seed=3)


@pytest.fixture(scope='module')
def tiny_l14_file(oracle_l14, tmp_path_factory):
    path = tmp_path_factory.mktemp('l14') / 'tiny-L-14-336px.pt'
    torch.save(oracle_l14.state_dict(), path)
    return path


def test_sizes_from_the_weights_of_vit_l14_336():
    """ViT-L/14@336px's shapes (on the meta device: nothing allocated) give its sizes."""
    with torch.device('meta'):
        clip = pytest.importorskip('clip').model.CLIP(
            embed_dim=768, image_resolution=336, vision_layers=24, vision_width=1024, vision_patch_size=14,
            context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12, transformer_layers=12)
    cfg = clip_config(clip.state_dict(), first_stage_layer=0)
    assert (cfg.vision_patch_size, cfg.image_resolution, cfg.grid_size) == (14, 336, 24)
    assert (cfg.vision_width, cfg.vision_layers, cfg.vision_heads, cfg.embed_dim) == (1024, 24, 16, 768)
    assert (cfg.text_width, cfg.text_heads, cfg.text_layers) == (768, 12, 12)


def test_plain_path_equals_the_clip_package(oracle_l14, tiny_l14_file):
    ours = load_clip(str(tiny_l14_file))
    assert (ours.patch_size, ours.visual.positional_embedding.shape[0]) == (14, 1 + 24 * 24)
    _check(ours, oracle_l14.encode_image, oracle_l14.encode_text, 336)
    # every token through ln_post and proj, as the dense methods read them, against the package's own modules
    images = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(2))
    v = oracle_l14.visual
    with torch.no_grad():
        x = v.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(2, 1, -1), x], dim=1) + v.positional_embedding
        x = v.transformer(v.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        expected = v.ln_post(x) @ v.proj
        torch.testing.assert_close(ours.encode_dense(images), expected, **EMBED)
        torch.testing.assert_close(ours.encode_text(tokenize(TEXTS)), oracle_l14.encode_text(tokenize(TEXTS)), **EMBED)


def test_open_clip_metaclip_style_patch14(tmp_path):
    """An open_clip ViT with patch 14 and QuickGELU (how MetaCLIP's ViT checkpoints are built) from its
    .safetensors file, checked against open_clip itself."""
    open_clip = pytest.importorskip('open_clip')
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file
    oc = _perturb(open_clip.model.CLIP(
        embed_dim=32, quick_gelu=True,
        vision_cfg=CLIPVisionCfg(layers=2, width=128, patch_size=14, image_size=112, head_width=64),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2)), seed=5)
    path = tmp_path / 'open_clip_model.safetensors'
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(path))
    ours = load_clip(str(path))
    assert ours.patch_size == 14
    _check(ours, oc.encode_image, oc.encode_text, 112)


def _vfm_for(name):
    """A second vision model for the methods that need one: the ProxyCLIP fixture's tiny DINO ViT (width 128, as
    the tiny CLIP: CASS maps DINO's heads onto CLIP's)."""
    from modules.vfm import VisionTransformerVFM
    from tests.conftest import FIXTURES
    sd = torch.load(FIXTURES / 'proxyclip_reference.pt', map_location='cpu', weights_only=True)['dino_state_dict']
    return VisionTransformerVFM.from_state_dict({k: v.float() for k, v in sd.items()}).eval()


@pytest.mark.parametrize('name', list(METHODS))
def test_every_method_runs_on_a_patch14_clip(name, tiny_l14_file):
    """Each method with its VOC21 preset (at a smaller short side) on the 24x24-grid CLIP: labels at the original
    size, finite probabilities, and the windows of two images batched equal to one image at a time."""
    clip = load_clip(str(tiny_l14_file))
    vfm = _vfm_for(name) if METHODS[name].vfm else None
    method = build_method(name, clip, vfm=vfm)
    settings = METHODS[name].settings('voc')
    seg = TrainingFreeSegmentor(method, name_lines=NAMES, **settings)
    g = torch.Generator().manual_seed(7)
    images = [torch.randn(3, 336, 392, generator=g), torch.randn(3, 280, 336, generator=g)]
    probs, pred = seg.predict(images[0][None], ori_shape=(120, 140))
    assert probs.shape == (4, 120, 140) and pred.shape == (1, 120, 140) and torch.isfinite(probs).all()
    batched = seg.slide_logits(images, batch_size=8)
    single = [seg.slide_logits([img], batch_size=1)[0] for img in images]
    for a, b in zip(batched, single):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
