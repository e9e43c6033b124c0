"""Model start-up without random initialisation, and --precision bf16 against fp32 (modules/precision.py)."""
import numpy as np
import pytest
import torch

from modules.checkpoint import load_segclip
from modules.modeling import SegCLIP, meta_construction
from modules.precision import model_precision, set_precision
from seg_segmentation.inference import ZeroShotSegmentor


def test_built_from_a_state_dict_without_initialisation(reference):
    sd = reference['segclip_state_dict']
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    model = SegCLIP.from_state_dict(sd)
    assert torch.equal(torch.rand(3), want)            # no random initialiser ran (each would draw from the RNG)
    own = model.state_dict()
    assert set(own) == set(sd) and all(torch.equal(own[k], sd[k]) for k in sd)
    trainable = {n: p.requires_grad for n, p in SegCLIP(model.config).named_parameters()}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():                              # the caller's tensors are not the model's
        model.clip.logit_scale.add_(1.0)
    assert not torch.equal(model.clip.logit_scale, sd['clip.logit_scale'])


def test_meta_construction_matches_the_real_one(reference):
    cfg = SegCLIP.config_from_state_dict(reference['segclip_state_dict'])
    with meta_construction():
        meta = SegCLIP(cfg)
    real = SegCLIP(cfg)
    m, r = meta.state_dict(), real.state_dict()
    assert list(m) == list(r)
    assert all(m[k].shape == r[k].shape and m[k].dtype == r[k].dtype for k in r)
    assert sum(not v.is_meta for v in m.values()) == 1     # only the MAE decoder's fixed sin-cos table is computed


def test_load_segclip_reads_the_file_and_casts(tiny_checkpoint, reference):
    sd = reference['segclip_state_dict']
    model = load_segclip(tiny_checkpoint, use_vision_mae_recon=False)
    own = model.state_dict()
    assert not model.training and model_precision(model) == 'fp32'
    assert all(torch.equal(own[k], sd[k]) for k in own)
    bf = load_segclip(tiny_checkpoint, use_vision_mae_recon=False, precision='bf16')
    assert model_precision(bf) == 'bf16'
    assert bf.clip.visual.conv1.weight.dtype == torch.bfloat16 and bf.clip.token_embedding.weight.dtype == torch.bfloat16
    assert bf.clip.visual.ln_pre.weight.dtype == torch.float32 and bf.clip.logit_scale.dtype == torch.float32
    lns = [m for m in bf.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert lns and all(p.dtype == torch.float32 for m in lns for p in m.parameters())


def test_fp32_precision_changes_nothing(tiny_model, reference):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    set_precision(tiny_model, 'fp32')
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in tiny_model.state_dict().items())
    with pytest.raises(ValueError, match='unknown precision'):
        set_precision(tiny_model, 'fp8')


def test_bf16_predictions_agree_with_fp32_on_the_fixture(tiny_model, reference):
    seg_ref = reference['seg']
    fp32 = ZeroShotSegmentor(tiny_model, text_embedding=seg_ref['text_embedding'])
    probs32 = fp32.slide_probs(seg_ref['slide_input'], crop=112, stride=112)
    pred32 = probs32.argmax(dim=1)
    assert torch.equal(pred32, seg_ref['slide_pred'])                 # fp32 is the 2022 reference
    bf16 = ZeroShotSegmentor(set_precision(tiny_model, 'bf16'), text_embedding=seg_ref['text_embedding'])
    soft, groups, embed = bf16.encode(seg_ref['whole_input'])
    assert soft.dtype == torch.float32 and torch.isfinite(soft).all() and torch.isfinite(groups).all()
    probs16 = bf16.slide_probs(seg_ref['slide_input'], crop=112, stride=112)
    agree = (probs16.argmax(dim=1) == pred32).double().mean().item()
    assert agree > 0.99, agree                                         # measured 0.998 (docs/evaluation.md)
    assert (probs16 - probs32).abs().mean() < 1e-3
