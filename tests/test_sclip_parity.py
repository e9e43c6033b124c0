"""Plain CLIP, SCLIP's dense features, its segmentation protocol and PAMR against outputs recorded from SCLIP's own
code (design.md §12, ``tests/fixtures/sclip_reference_public.pt``)."""
import pytest
import torch

from modules.clip import CLIP, round_weights_like_clip_load
from seg_segmentation.dense import TrainingFreeSegmentor
from seg_segmentation.methods import build_method
from seg_segmentation.pamr import pamr
from seg_segmentation.synonyms import ClassNamesError, parse_name_lines
from tests.conftest import SCLIP_REFERENCE_PT

FEATURES, LOGITS = dict(atol=1e-5, rtol=0), dict(atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def sclip_ref():
    return torch.load(SCLIP_REFERENCE_PT, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def clip_sd(reference, sclip_ref):
    """The recorded CLIP: the SegCLIP fixture's text tower + this fixture's visual tower (its config says so)."""
    sd = {k: v for k, v in reference["clip_state_dict"].items() if not k.startswith("visual.")}
    sd.update(sclip_ref["visual_state_dict"])
    return sd


@pytest.fixture(scope="module")
def sclip_clip(clip_sd):
    # SCLIP loads through clip.load(jit=False), which stores conv / linear / projection weights in float16 before
    # casting to float32 on a CPU: the recorded outputs are those of the rounded weights.
    return round_weights_like_clip_load(CLIP.from_state_dict(clip_sd)).eval()


def test_state_dict_round_trip_and_sizes(clip_sd, sclip_ref):
    model = CLIP.from_state_dict(clip_sd)
    assert set(model.state_dict()) == set(clip_sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, clip_sd[k]), k
    assert len(model.visual.transformer.resblocks) == sclip_ref["config"]["vision_layers"]
    assert model.visual.transformer.resblocks[0].attn.heads == 2 and model.patch_size == 16


def test_rounding_is_what_clip_load_does(clip_sd):
    """The rounding matches the clip package's own build_model (which converts to float16) cast back to float32."""
    build_model = pytest.importorskip("clip.model").build_model
    oracle = build_model(dict(clip_sd)).float().state_dict()
    ours = round_weights_like_clip_load(CLIP.from_state_dict(clip_sd)).state_dict()
    assert set(oracle) - {"input_resolution", "context_length", "vocab_size"} == set(ours)
    for k, v in ours.items():
        assert torch.equal(v, oracle[k]), k


@pytest.mark.parametrize("name, images, method", [("csa_224", "images_224", "sclip"),
                                                  ("plain_224", "images_224", "clip"),
                                                  ("csa_336", "images_336", "sclip")])
def test_dense_features(sclip_clip, sclip_ref, name, images, method):
    """The methods' patch features (the recorded tokens after the class token, on the patch grid)."""
    enc = sclip_ref["encode"]
    with torch.no_grad():
        out = build_method(method, sclip_clip).dense_features(enc[images], [None] * len(enc[images]))
    ref = enc[name][:, 1:]
    torch.testing.assert_close(out.flatten(1, 2), ref, **FEATURES)
    assert out.shape[1] * out.shape[2] == ref.shape[1] and out.shape[1] == enc[images].shape[-2] // 16


def test_plain_clip_tokens(sclip_clip, sclip_ref):
    """Every token of the unmodified CLIP, class token included."""
    enc = sclip_ref["encode"]
    with torch.no_grad():
        torch.testing.assert_close(sclip_clip.encode_dense(enc["images_224"]), enc["plain_224"], **FEATURES)


def test_image_embedding(sclip_clip, sclip_ref):
    with torch.no_grad():
        out = sclip_clip.encode_image(sclip_ref["encode"]["images_224"])
    torch.testing.assert_close(out, sclip_ref["encode"]["global_224"], **FEATURES)


def test_positional_embedding_resize_is_sclips_not_segclips(sclip_clip):
    """SCLIP's scale_factor resize samples differently from a resize to the same size (SegCLIP's)."""
    from modules.modeling import ViTBase
    v = sclip_clip.visual
    ours = v.positional_embedding_for(21, 21)
    segclip_way = ViTBase.positional_embedding_for(v, 21, 21)
    assert ours.shape == segclip_way.shape == (1 + 21 * 21, v.positional_embedding.shape[1])
    assert (ours - segclip_way).abs().max() > 1e-3


@pytest.fixture(scope="module")
def segmentors(sclip_clip, sclip_ref):
    p = sclip_ref["pipeline"]
    method = build_method("sclip", sclip_clip)
    return {case: TrainingFreeSegmentor(method, name_lines=sclip_ref["config"]["name_lines"], templates="full",
                                        logit_scale=c["logit_scale"], prob_thd=c["prob_thd"],
                                        area_thd=c["area_thd"], pamr_steps=c["pamr_steps"], pamr_dilations=(8, 16),
                                        crop=p["crop"], stride=p["stride"])
            for case, c in p["cases"].items()}


def test_query_features(segmentors, sclip_ref):
    queries = segmentors["default"].queries
    assert queries.words == sclip_ref["text"]["query_words"]
    assert torch.equal(queries.index, sclip_ref["text"]["query_idx"])
    torch.testing.assert_close(queries.features, sclip_ref["text"]["query_features"], **FEATURES)


@pytest.mark.parametrize("case", ["default", "voc21", "pamr"])
def test_protocol(segmentors, sclip_ref, case):
    p = sclip_ref["pipeline"]
    c = p["cases"][case]
    seg = segmentors[case]
    q = seg.query_logits(p["input"], p["ori_shape"])
    if "slide_logits" in c:
        torch.testing.assert_close(q, c["slide_logits"], **LOGITS)
    seg_logits, seg_pred = seg.predict(p["input"], ori_shape=p["ori_shape"])
    torch.testing.assert_close(seg_logits, c["seg_logits"], **LOGITS)
    assert seg_pred.shape == c["seg_pred"].shape
    assert torch.equal(seg_pred, c["seg_pred"].long())
    # the batched whole-split path gives the same labels
    (labels,) = seg.predict_labels([p["input"][0]], [p["ori_shape"]])
    assert torch.equal(labels, seg_pred[0])


def test_thresholds_do_something(segmentors, sclip_ref):
    """The voc21 case's area / probability thresholds change labels relative to the plain protocol (else the
    parity above would not test them)."""
    cases = sclip_ref["pipeline"]["cases"]
    assert not torch.equal(cases["default"]["seg_pred"], cases["voc21"]["seg_pred"])
    assert (cases["voc21"]["seg_pred"] == 0).sum() > (cases["default"]["seg_pred"] == 0).sum()


def test_pamr_alone(sclip_ref):
    r = sclip_ref["pamr"]
    torch.testing.assert_close(pamr(r["image"], r["mask"], r["steps"], r["dilations"]), r["out"], **LOGITS)


def test_name_lines():
    assert parse_name_lines(["sky, wall", "cat", "dog, puppy", ""]) == [["sky", "wall"], ["cat"], ["dog", "puppy"]]
    with pytest.raises(ClassNamesError, match=r"duplicate class name 'Cat' \(classes 0 and 1; 'cat' and 'Cat'"):
        parse_name_lines(["cat", "dog, Cat"])
    with pytest.raises(ClassNamesError, match="line 2 .* empty name"):
        parse_name_lines(["cat", "dog, "])
    with pytest.raises(ClassNamesError, match="line 2 .* is empty"):
        parse_name_lines(["cat", "", "dog"])
