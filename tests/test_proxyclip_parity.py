"""ProxyCLIP (seg_segmentation/methods/proxyclip.py, design.md §13.4) against outputs recorded from ProxyCLIP's own
code with DINO and DINOv2 proxies; batches computed per image; non-square windows; bf16.

Fixture ``tests/fixtures/proxyclip_reference.pt``, written by a one-off script from
``proxyclip_reference_public.pt`` (recorded on the CPU in float32 from github.com/mc-lan/ProxyCLIP at e7b767fb with
the official DINO / DINOv2 model code). Taken over unchanged: ``visual_state_dict`` (tiny CLIP visual tower, OpenAI
names; the tensors open_clip rounds to float16 stored as float16), ``dino_state_dict`` / ``dinov2_state_dict``,
``text`` (query words, classes, features), ``encode``'s ``images_224_u8``, ``proxy_224`` (batch of two, one μ for
the batch), ``proxy_224_single``, ``proxy_attn_rows_224`` / ``attn_rows``, ``sim_mean_224_batch`` /
``sim_mean_224_single``, ``dino_feats_336_c8``, ``proxy_336``, ``dinov2_proxy_224`` (joint μ), ``dinov2_proxy_336``;
``pipeline.input_u8`` / ``ori_shape``; per case its settings, ``seg_pred``, ``pred_ambiguous`` (as bool) and, for
``default``, ``window_logits`` / ``window_boxes``; the ``presets`` read from ProxyCLIP's configs. Compacted: the VFM
features keep their first 32 of 128 channels (``*_c32``); ``images_336_u8`` is not stored (it is the left 336 columns
of ``pipeline.input_u8``); ``seg_logits`` keep every second row and column (``config.seg_logits_stride``; the
labels are compared at every pixel) and are stored for ``default``, ``cityscapes`` and ``dinov2`` only - ``voc21``,
``context60`` and ``coco_object`` share ``default``'s probabilities (checked when the fixture was written). The
text tower is the non-``visual.`` part of the SegCLIP fixture's ``clip_state_dict``.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from modules.clip import CLIP, round_weights_like_clip_load
from modules.precision import set_precision
from modules.vfm import VisionTransformerVFM
from seg_segmentation.dense import TrainingFreeSegmentor
from seg_segmentation.inference import slide_windows
from seg_segmentation.methods import METHODS, build_method
from seg_segmentation.methods.proxyclip import imagenet_normalised, proxy_attention, similarity
from tests.conftest import FIXTURES

FEATURES, LOGITS = dict(atol=1e-5, rtol=0), dict(atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURES / "proxyclip_reference.pt", map_location="cpu", weights_only=True)


def clip_state_dict(reference, ref):
    sd = {k: v for k, v in reference["clip_state_dict"].items() if not k.startswith("visual.")}
    sd.update({k: v.float() for k, v in ref["visual_state_dict"].items()})
    return sd


def build(reference, ref, which="dino"):
    """The recorded models: CLIP as open_clip builds it with precision='fp16' (the same float16 rounding as
    clip.load; computed in float32 here, as recorded), the VFM from its official-layout state dict."""
    clip = round_weights_like_clip_load(CLIP.from_state_dict(clip_state_dict(reference, ref)))
    vfm = VisionTransformerVFM.from_state_dict(ref[f"{which}_state_dict"])
    return build_method("proxyclip", clip, vfm=vfm)


@pytest.fixture(scope="module")
def methods(reference, ref):
    return {which: build(reference, ref, which) for which in ("dino", "dinov2")}


def preprocess(ref, u8):
    """8-bit RGB -> ProxyCLIP's evaluation input ((x - mean) / std with its data preprocessor's constants)."""
    c = ref["config"]
    return (u8.float() - torch.tensor(c["preprocess_mean"]).view(1, 3, 1, 1)) / \
        torch.tensor(c["preprocess_std"]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def inputs(ref):
    return dict(x224=preprocess(ref, ref["encode"]["images_224_u8"]),
                x336=preprocess(ref, ref["pipeline"]["input_u8"][..., :336]),
                image=preprocess(ref, ref["pipeline"]["input_u8"]))


def test_clip_rounding_is_open_clips(reference, ref):
    """Exactly the tensors open_clip stored in float16 are rounded: those are unchanged by the rounding (stored
    float16 in the fixture), the float32 ones (LayerNorms, class and positional embeddings, none float16-exact)
    are left alone."""
    model = round_weights_like_clip_load(CLIP.from_state_dict(clip_state_dict(reference, ref)))
    own = model.state_dict()
    for k, v in ref["visual_state_dict"].items():
        assert torch.equal(own[k], v.float()), k
    assert sum(v.dtype == torch.float16 for v in ref["visual_state_dict"].values()) == 34   # conv1, proj, 8 per block


def test_similarity_mean_and_attention_rows(methods, ref, inputs):
    """μ per image and over the batch (the original's), and rows of the proxy attention of the batch-of-two call
    (joint μ) - the formula of design.md §13.4 on the recorded DINO features."""
    enc = ref["encode"]
    with torch.no_grad():
        feats = methods["dino"].vfm_model.features(imagenet_normalised(inputs["x224"]))   # [2, 128, 28, 28]
    sim = similarity(feats)                                                                # [2, 784, 784]
    torch.testing.assert_close(sim.mean(), enc["sim_mean_224_batch"], **FEATURES)
    torch.testing.assert_close(sim[0].mean(), enc["sim_mean_224_single"], **FEATURES)
    attn = proxy_attention(sim, 1.2, 3.0, mu=sim.mean())
    torch.testing.assert_close(attn[0, enc["attn_rows"]], enc["proxy_attn_rows_224"], **FEATURES)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 784)) and (attn == 0).float().mean() > 0.3   # masked entries


@pytest.mark.parametrize("which, images, field", [("dino", "x224", "proxy_224_single"), ("dino", "x336", "proxy_336"),
                                                  ("dinov2", "x336", "dinov2_proxy_336")])
def test_dense_features(methods, ref, inputs, which, images, field):
    """Output tokens on the VFM's grid: 28×28 / 42×42 for DINO/8 at 224 / 336 px, 24×24 for DINOv2/14 at 336."""
    x = inputs[images][:1]
    with torch.no_grad():
        out = methods[which].dense_features(x, [None])
    p = methods[which].vfm_model.patch_size
    assert out.shape == (1, x.shape[-2] // p, x.shape[-1] // p, 32)
    torch.testing.assert_close(out.flatten(1, 2), ref["encode"][field], **FEATURES)


@pytest.mark.parametrize("which, field", [("dino", "proxy_224"), ("dinov2", "dinov2_proxy_224")])
def test_joint_mean_of_the_original(methods, ref, inputs, which, field):
    """The recorded batch-of-two outputs, reproduced by taking μ over the batch as the original does."""
    m = methods[which]
    with torch.no_grad():
        feats = m.vfm_model.features(imagenet_normalised(inputs["x224"]))
        sim = similarity(feats)
        out = m.attend(inputs["x224"], proxy_attention(sim, m.proxy_beta, m.proxy_gamma, mu=sim.mean()),
                       feats.shape[-2:])
    torch.testing.assert_close(out.flatten(1, 2), ref["encode"][field], **FEATURES)


@pytest.mark.parametrize("which", ["dino", "dinov2"])
def test_batch_n_is_batch_1(methods, ref, inputs, which):
    """Each image of a batch gets its own μ: the batch of two equals each image alone (the original's joint μ
    moves image 0 by 0.2); equal to float noise (measured 1.7e-6, asserted at the features' 1e-5: the same
    arithmetic per image, only the blocking of CLIP's batched matrix products differs)."""
    m = methods[which]
    with torch.no_grad():
        both = m.dense_features(inputs["x224"], [None, None])
        alone = [m.dense_features(inputs["x224"][i:i + 1], [None]) for i in range(2)]
    torch.testing.assert_close(both, torch.cat(alone), **FEATURES)
    joint = ref["encode"]["proxy_224" if which == "dino" else "dinov2_proxy_224"]
    assert (joint[0] - both[0].flatten(0, 1)).abs().max() > 0.05
    if which == "dino":
        torch.testing.assert_close(both[:1].flatten(1, 2), ref["encode"]["proxy_224_single"], **FEATURES)


def _transposed(method):
    """The same method with every patch kernel and positional grid transposed (CLIP's and the VFM's): on a
    transposed image it must compute the transposed features - which a mix-up of heights and widths breaks."""
    t = copy.deepcopy(method)
    with torch.no_grad():
        for conv in (t.clip.visual.conv1, t.vfm_model.patch_embed.proj):
            conv.weight.copy_(conv.weight.transpose(-1, -2).clone())
        for pos in (t.clip.visual.positional_embedding, t.vfm_model.pos_embed[0]):
            n = round((pos.shape[0] - 1) ** 0.5)
            pos[1:] = pos[1:].unflatten(0, (n, n)).transpose(0, 1).flatten(0, 1).clone()
    return t


@pytest.mark.parametrize("which", ["dino", "dinov2"])
def test_non_square_window(methods, inputs, which):
    """A 336×448 window (ProxyCLIP reshapes with the height twice and swaps the sizes of CLIP's grid, so it cannot
    run one): [1, 336/p, 448/p, D], and transposing image and models transposes the result."""
    m = methods[which]
    x = inputs["image"]                                                   # [1, 3, 336, 448]
    with torch.no_grad():
        out = m.dense_features(x, [None])
        out_t = _transposed(m).dense_features(x.transpose(-1, -2), [None])
    p = m.vfm_model.patch_size
    assert out.shape == (1, 336 // p, 448 // p, 32)
    torch.testing.assert_close(out_t, out.transpose(1, 2), **FEATURES)
    assert (out - out.mean((1, 2), keepdim=True)).abs().amax() > 0.1      # not a constant map


# ------------------------------------------------------------------------------------------------ the segmentor
@pytest.fixture(scope="module")
def segmentors(methods, ref):
    """One segmentor per VFM, the recorded names (ProxyCLIP's class files separate synonyms with '; ')."""
    classes = [line.split("; ") for line in ref["config"]["name_lines"]]
    return {which: TrainingFreeSegmentor(m, classes=classes, **m.settings("voc20")) for which, m in methods.items()}


def test_query_features(segmentors, ref):
    q = segmentors["dino"].queries
    assert q.words == ref["text"]["query_words"] and "person, people" in q.words
    assert torch.equal(q.index, ref["text"]["query_idx"])
    torch.testing.assert_close(q.features, ref["text"]["query_features"], **FEATURES)


def test_window_logits(methods, segmentors, ref, inputs):
    """Each window's cosine logits on the 42×42 DINO grid (before the resize to the window)."""
    case = ref["pipeline"]["cases"]["default"]
    image = inputs["image"][0]
    boxes = slide_windows(*image.shape[-2:], 336, 112)
    assert boxes == [tuple(b) for b in case["window_boxes"].tolist()]
    crops = torch.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
    with torch.no_grad():
        feats = F.normalize(methods["dino"].dense_features(crops, [None, None]), dim=-1)
    logits = (feats @ segmentors["dino"].queries.features.T).permute(0, 3, 1, 2)
    torch.testing.assert_close(logits, case["window_logits"], **LOGITS)


@pytest.fixture(scope="module")
def probabilities(segmentors, ref, inputs):
    """Window-averaged query logits at the original size, per (VFM, crop): the cases differ only by thresholds."""
    p = ref["pipeline"]
    out = {}
    for which, crop in (("dino", 336), ("dino", 224), ("dinov2", 336)):
        (logits,) = segmentors[which].slide_logits(inputs["image"], crop=crop, stride=112)
        out[which, crop] = segmentors[which].resize_and_refine(logits, inputs["image"][0], p["ori_shape"])
    return out


@pytest.mark.parametrize("case", ["default", "voc21", "context60", "coco_object", "cityscapes", "dinov2"])
def test_pipeline(segmentors, probabilities, ref, case):
    p = ref["pipeline"]
    c = p["cases"][case]
    assert (c["logit_scale"], c["beta"], c["gamma"], c["slide_stride"]) == (40, 1.2, 3.0, 112)
    seg = copy.copy(segmentors[c["vfm"]])      # the same queries, this case's thresholds
    seg.prob_thd, seg.logit_scale = c["prob_thd"], c["logit_scale"]
    seg_logits, seg_pred = seg.postprocess(probabilities[c["vfm"], c["slide_crop"]])
    s = ref["config"]["seg_logits_stride"]
    recorded = c.get("seg_logits", p["cases"]["default"]["seg_logits"])
    torch.testing.assert_close(seg_logits[:, ::s, ::s], recorded, **LOGITS)
    sure = ~c["pred_ambiguous"]
    assert seg_pred.shape == c["seg_pred"].shape
    assert torch.equal(seg_pred[sure], c["seg_pred"].long()[sure])
    assert sure.sum() > 0.99 * sure.numel()


def test_thresholds_act(ref):
    cases = ref["pipeline"]["cases"]
    for case in ("voc21", "context60", "coco_object"):
        assert (cases[case]["seg_pred"] == 0).sum() > (cases["default"]["seg_pred"] == 0).sum()


def test_slide_batch_n_is_batch_1(segmentors, inputs):
    """Windows of two images of different sizes pooled into batches (224 px windows; the 200×300 image's are smaller
    than the crop: padded to 224×224) equal one window at a time, to float noise (as above)."""
    seg = segmentors["dino"]
    images = [inputs["image"][0, :, :224, :336], inputs["image"][0, :, 100:300, 120:420]]
    pooled = seg.slide_logits(images, crop=224, stride=112, batch_size=16)
    single = seg.slide_logits(images, crop=224, stride=112, batch_size=1)
    for a, b in zip(pooled, single):
        torch.testing.assert_close(a, b, **FEATURES)


def test_presets(ref):
    """Every dataset's settings as ProxyCLIP's configs give them."""
    config = {"voc": "cfg_voc21.py", "context": "cfg_context60.py", "coco": "cfg_coco_object.py",
              "voc20": "cfg_voc20.py", "context59": "cfg_context59.py", "coco_stuff": "cfg_coco_stuff164k.py",
              "cityscapes": "cfg_city_scapes.py", "ade20k": "cfg_ade20k.py"}
    cls = METHODS["proxyclip"]
    for dataset, name in config.items():
        r, s = ref["presets"][name], cls.settings(dataset)
        assert (s["resolution"], s["crop"], s["stride"], s["prob_thd"], s["logit_scale"]) == \
            (r["short_side"], r["slide_crop"], r["slide_stride"], r["prob_thd"], r["logit_scale"]), dataset
        assert (s["proxy_beta"], s["proxy_gamma"], s["pamr_steps"], s["area_thd"]) == (r["beta"], r["gamma"], 0, None)
        assert r["vfm_model"] == "dino" and cls.vfm == "dino_vitb8" and not r["pamr"]
    assert cls.pad_multiple == 56 and set(cls.published) == set(config)
    assert abs(sum(cls.published.values()) / 8 - 42.3) < 0.05


def test_knobs(methods, inputs):
    m = methods["dino"]
    with torch.no_grad():
        base = m.dense_features(inputs["x224"][:1], [None])
        m.configure(proxy_beta=0.5, proxy_gamma=1.0)
        try:
            other = m.dense_features(inputs["x224"][:1], [None])
        finally:
            m.configure(proxy_beta=1.2, proxy_gamma=3.0)
    assert (base - other).abs().max() > 1e-2
    with pytest.raises(ValueError, match="proxy_beta must be float"):
        m.configure(proxy_beta="lots")


def test_bf16(reference, ref, inputs, segmentors, probabilities):
    """--precision bf16 casts the VFM too: its features, and the labels of the default case against fp32."""
    method = set_precision(build(reference, ref, "dino"), "bf16").eval()
    assert method.vfm_model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert method.vfm_model.norm.weight.dtype == torch.float32
    with torch.no_grad():
        f32 = segmentors["dino"].method.vfm_model.features(imagenet_normalised(inputs["x336"]))
        f16 = method.vfm_model.features(imagenet_normalised(inputs["x336"]))
    assert f16.dtype == torch.bfloat16
    cos = F.cosine_similarity(f16.float(), f32, dim=1)
    assert cos.mean() > 0.999, cos.mean()
    classes = [line.split("; ") for line in ref["config"]["name_lines"]]
    seg = TrainingFreeSegmentor(method, classes=classes, **method.settings("voc20"))
    _, pred = seg.predict(inputs["image"], ref["pipeline"]["ori_shape"])
    _, pred32 = segmentors["dino"].postprocess(probabilities["dino", 336])
    agreement = (pred == pred32).float().mean().item()
    print(f"bf16 vs fp32 pixel agreement: {agreement:.4f}; VFM feature cosine {cos.mean():.5f}")
    assert agreement > 0.9
