"""ClearCLIP (seg_segmentation/methods/clearclip.py, design.md §13.1) against outputs recorded from ClearCLIP's own
code (mc-lan/ClearCLIP at ad68a404, CPU, float32) on a tiny random CLIP.

``tests/fixtures/clearclip_reference.pt`` holds these fields of the recorded file ``clearclip_reference_public.pt``
(float16 where the recording stored float16, as recorded otherwise):
  config: name_lines, pixel_mean, pixel_std, vision_layers, vision_heads, patch_size, visual_fp16_keys;
  visual_state_dict: the visual tower (its float16 tensors are the values after ClearCLIP's fp16 load);
  encode: images_224_uint8, clearclip_224, vanilla_noresidual_224, clip_224, clearclip_full, pre_last_224_img0,
      qq_attn_224_img0, attn_out_224_img0;
  text: query_words, query_idx, query_features, and the recording's 80 ``templates``;
  pipeline: image_uint8, ori_shape and per case its settings, windows, seg_pred, argmax_margin_min,
      thd_margin_min, seg_logits (context60, coco_object and voc20 share voc21's: ``same_logits_as``) and, for voc21
      and city_scapes, window_logits.
The text tower is the non-``visual.`` part of ``clip_state_dict`` in ``tests/fixtures/segclip_reference_public.pt``,
as in the recording.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from modules.clip import CLIP, round_weights_like_clip_load
from modules.precision import set_precision
from modules.tokenization_clip import tokenize
from seg_segmentation.dense import TrainingFreeSegmentor
from seg_segmentation.inference import slide_windows
from seg_segmentation.methods import METHODS, build_method
from seg_segmentation.methods.base import PAD_TO_PATCH, pad_or_cut
from seg_segmentation.methods.clearclip import ClearCLIP, clear_attention, last_block_attention
from seg_segmentation.templates import get_templates
from tests.conftest import FIXTURES

CLEARCLIP_REFERENCE_PT = FIXTURES / "clearclip_reference.pt"
FEATURES, LOGITS = dict(atol=1e-5, rtol=0), dict(atol=1e-4, rtol=0)
NEAR_TIE = 1e-4          # the doc's decision margin: labels of pixels closer than this to a decision may differ
# the recorded model_type values and their knob values here
MODEL_TYPE = {"ClearCLIP": "clearclip", "vanilla": "vanilla"}


@pytest.fixture(scope="module")
def ref():
    return torch.load(CLEARCLIP_REFERENCE_PT, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def clip_sd(reference, ref):
    sd = {k: v for k, v in reference["clip_state_dict"].items() if not k.startswith("visual.")}
    sd.update({k: v.float() for k, v in ref["visual_state_dict"].items()})
    return sd


@pytest.fixture(scope="module")
def clip(clip_sd):
    # open_clip's precision='fp16' load rounds the same tensors as clip.load (the test below checks which); the
    # stored visual ones are rounded already, the text tower's are rounded here
    return round_weights_like_clip_load(CLIP.from_state_dict(clip_sd)).eval()


def normalise(ref, images_uint8):
    mean, std = ref["config"]["pixel_mean"], ref["config"]["pixel_std"]
    return (images_uint8.float() - mean[:, None, None]) / std[:, None, None]


@pytest.fixture(scope="module")
def pipeline_input(ref):
    return normalise(ref, ref["pipeline"]["image_uint8"])                      # [1, 3, 448, 597]


def case_settings(c):
    return dict(model_type=MODEL_TYPE[c["model_type"]], ignore_residual=c["ignore_residual"])


@pytest.fixture(scope="module")
def text_side(clip, ref):
    """The fixture's vocabulary, encoded once (the method's knobs do not change the text side)."""
    return TrainingFreeSegmentor(build_method("clearclip", clip), name_lines=ref["config"]["name_lines"])


def segmentor(text_side, c, method=None):
    """The segmentor of a recorded case: its method settings, thresholds and windows on the shared queries."""
    seg = copy.copy(text_side)
    seg.method = build_method("clearclip", text_side.method.clip, **case_settings(c)) if method is None else method
    seg.logit_scale, seg.prob_thd, seg.crop, seg.stride = (float(c["logit_scale"]), float(c["prob_thd"]),
                                                           c["slide_crop"], c["slide_stride"])
    return seg


# ---------------------------------------------------------------------- loading
def test_fp16_rounding_touches_the_tensors_open_clip_rounds(clip_sd, ref):
    """Perturbed float32 visual weights: after ``round_weights_like_clip_load`` exactly the recorded
    ``visual_fp16_keys`` are float16 values, every other tensor is untouched."""
    g = torch.Generator().manual_seed(0)
    noisy = {k: v + 1e-3 * torch.randn(v.shape, generator=g) if k.startswith("visual.") else v
             for k, v in clip_sd.items()}
    rounded = round_weights_like_clip_load(CLIP.from_state_dict(noisy)).state_dict()
    changed = {k for k, v in rounded.items() if k.startswith("visual.") and not torch.equal(v, noisy[k])}
    assert changed == set(ref["config"]["visual_fp16_keys"])
    assert all(torch.equal(rounded[k], rounded[k].half().float()) for k in changed)
    # the stored tensors are the rounded values: rounding again changes nothing
    plain = CLIP.from_state_dict(clip_sd).state_dict()
    for k, v in round_weights_like_clip_load(CLIP.from_state_dict(clip_sd)).state_dict().items():
        if k.startswith("visual."):
            assert torch.equal(v, plain[k]), k


def test_sizes(clip, ref):
    cfg = ref["config"]
    blocks = clip.visual.transformer.resblocks
    assert len(blocks) == cfg["vision_layers"] and blocks[-1].attn.heads == cfg["vision_heads"]
    assert clip.patch_size == cfg["patch_size"]


# ---------------------------------------------------------------------- the visual change
@pytest.mark.parametrize("name, knobs", [("clearclip_224", {}),
                                         ("vanilla_noresidual_224", dict(model_type="vanilla")),
                                         ("clip_224", dict(model_type="vanilla", ignore_residual=False))])
def test_dense_features(clip, ref, name, knobs):
    images = normalise(ref, ref["encode"]["images_224_uint8"])
    with torch.no_grad():
        out = build_method("clearclip", clip, **knobs).dense_features(images, [None, None])
    assert out.shape == (2, 14, 14, 32)
    torch.testing.assert_close(out.flatten(1, 2), ref["encode"][name], **FEATURES)


def test_vanilla_with_residual_is_plain_clip(clip, ref):
    images = normalise(ref, ref["encode"]["images_224_uint8"])
    with torch.no_grad():
        plain = build_method("clip", clip).dense_features(images, [None, None])
    torch.testing.assert_close(plain.flatten(1, 2), ref["encode"]["clip_224"], **FEATURES)


def test_intermediates(clip, ref):
    """Image 0: the last block's input, its query-query attention per head, the attention output."""
    enc = ref["encode"]
    visual = clip.visual
    last = visual.transformer.resblocks[-1]
    with torch.no_grad():
        x = visual.tokens_before_last(normalise(ref, enc["images_224_uint8"][:1]))      # [1, 197, 128]
        torch.testing.assert_close(x, enc["pre_last_224_img0"], **FEATURES)
        q, k, _ = last.attn.qkv_heads(last.ln_1(x))
        torch.testing.assert_close(last_block_attention(q, k, "clearclip")[0], enc["qq_attn_224_img0"], **FEATURES)
        torch.testing.assert_close(clear_attention(last.attn, last.ln_1(x), "clearclip"), enc["attn_out_224_img0"],
                                   **FEATURES)
        # q·kᵀ is another matrix (else the two knobs would test the same thing)
        assert (last_block_attention(q, k, "vanilla")[0] - enc["qq_attn_224_img0"]).abs().max() > 1e-2


def test_whole_image_non_square(clip, ref, pipeline_input):
    """448 x 597 -> a 28 x 37 grid: the positional embedding resized with ClearCLIP's scale factors, the 5
    columns the patch convolution does not reach dropped."""
    crops, box = pad_or_cut(pipeline_input, 16)
    assert box is None and crops.shape[-2:] == (448, 592)
    with torch.no_grad():
        out = build_method("clearclip", clip).dense_features(crops, [None])
    assert out.shape == (1, 28, 37, 32)
    torch.testing.assert_close(out.flatten(1, 2), ref["encode"]["clearclip_full"], **FEATURES)


def test_non_square_grid_of_the_stored_size_is_resized(clip):
    """A 7 x 28 grid has the stored 196 patches: ClearCLIP adds the 14 x 14 embedding unresized (its test is on the
    token count); here it is resized like any other grid."""
    visual = clip.visual
    stored = visual.positional_embedding
    grid = stored[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(7.1 / 14, 28.1 / 14), mode="bicubic", align_corners=False)
    with torch.no_grad():
        pos = visual.positional_embedding_for(7, 28)
        assert torch.equal(pos[1:], want.permute(0, 2, 3, 1).reshape(196, -1)) and torch.equal(pos[0], stored[0])
        assert (pos - stored).abs().max() > 1e-2
        assert build_method("clearclip", clip).dense_features(torch.randn(1, 3, 112, 448), [None]).shape == \
            (1, 7, 28, 32)


# ---------------------------------------------------------------------- text
def test_query_features(text_side, ref):
    """ClearCLIP splits class lines on ',' and keeps the space before a synonym (' train'); the project splits on
    ', '. The tokenizer strips that space, so the prompts' tokens and the query features are the same."""
    text = ref["text"]
    assert list(get_templates("full")) == text["templates"]
    seg = text_side
    recorded = text["query_words"]
    assert any(w.startswith(" ") for w in recorded)
    assert seg.queries.words == [w.strip() for w in recorded]
    prompts = lambda words: [t.format(w) for w in words for t in text["templates"]]
    assert torch.equal(tokenize(prompts(recorded)), tokenize(prompts(seg.queries.words)))
    assert torch.equal(seg.queries.index.cpu(), text["query_idx"])
    torch.testing.assert_close(seg.queries.features, text["query_features"], **FEATURES)


# ---------------------------------------------------------------------- windows and the protocol
@pytest.mark.parametrize("case", ["voc21", "city_scapes"])
def test_window_logits(text_side, ref, pipeline_input, case):
    """Every window of the case in one batch; the recorded grid logits resized to the window as the original does."""
    c = ref["pipeline"]["cases"][case]
    assert slide_windows(448, 597, c["slide_crop"], c["slide_stride"]) == [tuple(w) for w in c["windows"]]
    seg = segmentor(text_side, c)
    crops = torch.cat([pipeline_input[..., y1:y2, x1:x2] for y1, y2, x1, x2 in c["windows"]])
    with torch.no_grad():
        out = seg.method.window_logits(crops, seg.queries, [None] * len(crops))
    want = torch.cat([F.interpolate(w, size=crops.shape[-2:], mode="bilinear", align_corners=False)
                      for w in c["window_logits"]])
    torch.testing.assert_close(out, want, **FEATURES)


@pytest.fixture(scope="module")
def query_logits(text_side, ref, pipeline_input):
    """Logits at the original size per case (cases sharing their settings up to the thresholds computed once)."""
    p = ref["pipeline"]
    out = {}
    for name, c in p["cases"].items():
        key = (c["model_type"], c["ignore_residual"], c["slide_crop"], c["slide_stride"])
        if key not in out:
            out[key] = segmentor(text_side, c).query_logits(pipeline_input, p["ori_shape"])[0]
    return out


def near_ties(seg_logits, prob_thd):
    """[C, H, W] recorded probabilities -> [1, H, W]: pixels within NEAR_TIE of the argmax or threshold decision."""
    top2 = seg_logits.topk(2, dim=0).values
    tie = top2[0] - top2[1] < NEAR_TIE
    if prob_thd > 0:
        tie |= (top2[0] - prob_thd).abs() < NEAR_TIE
    return tie[None], (top2[0] - top2[1]).min(), (top2[0] - prob_thd).abs().min()


@pytest.mark.parametrize("case", ["voc21", "context60", "coco_object", "voc20", "city_scapes", "vanilla_noresidual"])
def test_protocol(text_side, ref, pipeline_input, query_logits, case):
    p = ref["pipeline"]
    c = p["cases"][case]
    seg = segmentor(text_side, c)
    key = (c["model_type"], c["ignore_residual"], c["slide_crop"], c["slide_stride"])
    seg_logits, seg_pred = seg.postprocess(query_logits[key])
    ref_logits = c["seg_logits"] if "seg_logits" in c else p["cases"][c["same_logits_as"]]["seg_logits"]
    torch.testing.assert_close(seg_logits, ref_logits, **LOGITS)
    tie, argmax_margin, thd_margin = near_ties(ref_logits, c["prob_thd"])
    assert argmax_margin.item() == pytest.approx(c["argmax_margin_min"], abs=1e-7)
    if c["thd_margin_min"] is not None:
        assert thd_margin.item() == pytest.approx(c["thd_margin_min"], abs=1e-7)
    assert tie.sum() <= 5
    want = c["seg_pred"].long()
    assert seg_pred.shape == want.shape and torch.equal(seg_pred[~tie], want[~tie])
    if case in ("voc21", "city_scapes"):      # the batched path of the evaluation gives the same labels
        (labels,) = seg.predict_labels([pipeline_input[0]], [p["ori_shape"]])
        assert torch.equal(labels[~tie[0]], want[0][~tie[0]])


def test_thresholds_change_labels(ref):
    """The four cases that share logits differ only by prob_thd; their recorded labels differ (else the parity
    above would not test the threshold)."""
    cases = ref["pipeline"]["cases"]
    preds = [cases[k]["seg_pred"] for k in ("voc21", "context60", "coco_object", "voc20")]
    assert len({tuple(p.flatten().tolist()) for p in preds}) >= 3
    assert (preds[0] == 0).sum() > (preds[3] == 0).sum()


# ---------------------------------------------------------------------- batching, padding, precision
# Batched and single runs do the same per-sample arithmetic, but the matrix products may block differently: equal to
# float32 rounding noise (bit-identical on this machine; 2e-6 leaves room for BLAS builds that block differently).
BATCH = dict(atol=2e-6, rtol=0)


def test_batch_n_equals_batch_1_features(clip, ref):
    images = normalise(ref, ref["encode"]["images_224_uint8"])
    method = build_method("clearclip", clip)
    with torch.no_grad():
        both = method.dense_features(images, [None, None])
        for i in range(2):
            torch.testing.assert_close(both[i:i + 1], method.dense_features(images[i:i + 1], [None]), **BATCH)


def test_batch_n_equals_batch_1_images_of_different_sizes(text_side, ref, pipeline_input):
    """Images of different sizes whose windows are pooled into batches, against one window at a time (Cityscapes'
    224 / 224 windows, to keep it quick)."""
    seg = segmentor(text_side, ref["pipeline"]["cases"]["city_scapes"])
    img = pipeline_input[0]
    # 224 x 300 and 224 x 260: two 224 x 224 windows each; 200 x 250: two 200 x 224 windows, padded to 208 x 224
    images = [img[:, :224, :300], img[:, 100:324, 250:510], img[:, 200:400, 300:550].flip(-1)]
    with torch.no_grad():
        pooled = seg.slide_logits(images, batch_size=16)
        single = [seg.slide_logits([im], batch_size=1)[0] for im in images]
    for a, b in zip(pooled, single):
        torch.testing.assert_close(a, b, **BATCH)
    assert torch.equal(seg.slide_logits(images[:1])[0], pooled[0])


def test_odd_windows_are_padded_centred(text_side, ref, pipeline_input):
    """A 200 x 300 window (no preset makes one) is zero-padded to 208 x 304 - 4 rows above and below, 2 columns left
    and right - and its logits are cut back, as ClearCLIP's compute_padsize does."""
    seg = segmentor(text_side, ref["pipeline"]["cases"]["voc20"])
    crop = pipeline_input[..., 100:300, 50:350]
    with torch.no_grad():
        out = seg.method.window_logits(crop, seg.queries, [None])
        padded = F.pad(crop, (2, 2, 4, 4))
        feats = F.normalize(seg.method.dense_features(padded, [None]), dim=-1)     # [1, 13, 19, 32]
        grid = (feats @ seg.queries.features.T).permute(0, 3, 1, 2)
        want = F.interpolate(grid, size=(208, 304), mode="bilinear", align_corners=False)[..., 4:204, 2:302]
    assert out.shape == (1, 17, 200, 300)
    torch.testing.assert_close(out, want, **FEATURES)
    # cutting the remainder instead (pad_multiple 0) is another result
    cut = copy.copy(seg.method)
    cut.pad_multiple = 0
    with torch.no_grad():
        assert (cut.window_logits(crop, seg.queries, [None]) - out).abs().max() > 1e-3


BF16_FLOOR = 0.95


def test_bf16_agreement(text_side, ref, pipeline_input):
    """--precision bf16 (the text side encoded in bf16 too): pixel agreement of the labels with the recorded
    float32 ones on the pipeline input."""
    method = set_precision(build_method("clearclip", copy.deepcopy(text_side.method.clip)), "bf16")
    assert method.clip.visual.conv1.weight.dtype == torch.bfloat16
    seg = TrainingFreeSegmentor(method, name_lines=ref["config"]["name_lines"])
    p = ref["pipeline"]
    agreement, logits = {}, {}
    for case in ("voc21", "voc20", "city_scapes"):
        c = p["cases"][case]
        case_seg = segmentor(seg, c, method=method)
        key = (c["slide_crop"], c["slide_stride"])
        if key not in logits:
            logits[key] = case_seg.query_logits(pipeline_input, p["ori_shape"])[0]
        pred = case_seg.postprocess(logits[key])[1]
        agreement[case] = (pred == c["seg_pred"].long()).float().mean().item()
    print("bf16 pixel agreement with fp32:", agreement)
    assert min(agreement.values()) >= BF16_FLOOR, agreement


# ---------------------------------------------------------------------- presets and knobs
def test_presets_and_knobs():
    assert METHODS["clearclip"] is ClearCLIP
    table = {  # dataset: (crop, stride, prob_thd, published mIoU) - ClearCLIP's configs and paper
        "voc": (448, 224, 0.5, 51.8), "context": (448, 224, 0.15, 32.6), "coco": (448, 224, 0.4, 33.0),
        "voc20": (448, 224, 0.0, 80.9), "context59": (448, 224, 0.0, 35.9), "coco_stuff": (448, 224, 0.0, 23.9),
        "cityscapes": (224, 224, 0.0, 30.0), "ade20k": (448, 224, 0.0, 16.7)}
    for dataset, (crop, stride, prob_thd, miou) in table.items():
        s = ClearCLIP.settings(dataset)
        assert (s["resolution"], s["crop"], s["stride"], s["logit_scale"], s["prob_thd"]) == \
            (448, crop, stride, 50.0, prob_thd), dataset
        assert (s["templates"], s["area_thd"], s["pamr_steps"]) == ("full", None, 0)
        assert (s["model_type"], s["ignore_residual"]) == ("clearclip", True)
        assert ClearCLIP.published[dataset] == miou
    assert set(ClearCLIP.presets) == set(table) == set(ClearCLIP.published)
    assert round(sum(ClearCLIP.published.values()) / 8, 1) == 38.1
    assert ClearCLIP.settings("custom") == ClearCLIP.settings("voc20")
    assert ClearCLIP.pad_multiple == PAD_TO_PATCH and not ClearCLIP.renormalize and ClearCLIP.vfm is None


def test_knob_values(clip):
    method = build_method("clearclip", clip)
    assert method.knob_values() == dict(model_type="clearclip", ignore_residual=True)
    assert method.configure(model_type="vanilla", ignore_residual=False).knob_values() == \
        dict(model_type="vanilla", ignore_residual=False)
    with pytest.raises(ValueError, match="model_type must be one of clearclip, vanilla, got 'ClearCLIP'"):
        method.configure(model_type="ClearCLIP")
    with pytest.raises(ValueError, match="ignore_residual must be true or false"):
        method.configure(ignore_residual="yes")
