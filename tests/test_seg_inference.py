"""ZeroShotSegmentor vs the 2022 reference outputs (design.md §7.1 - §7.3, fixture ``seg``)."""
import pytest
import torch
import torch.nn.functional as F

from seg_segmentation.inference import ZeroShotSegmentor, build_text_embedding, slide_windows
from seg_segmentation.templates import TEMPLATES, get_templates
from modules.tokenization_clip import tokenize

ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture()
def seg_ref(reference):
    return reference['seg']


def test_text_embedding_from_class_names_matches_fixture(tiny_model, reference, seg_ref):
    seg = ZeroShotSegmentor(tiny_model, class_names=reference['config']['class_names'])
    assert seg.text_embedding.shape == (20, 32)
    torch.testing.assert_close(seg.text_embedding, seg_ref['text_embedding'], atol=ATOL, rtol=RTOL)
    # a leading 'background' is never encoded
    seg_bg = ZeroShotSegmentor(tiny_model, class_names=['background'] + reference['config']['class_names'])
    torch.testing.assert_close(seg_bg.text_embedding, seg.text_embedding)


def test_crop_logits_match_fixture(tiny_model, seg_ref):
    seg = ZeroShotSegmentor(tiny_model, text_embedding=seg_ref['text_embedding'], bg_thresh=0.8)
    out = seg.crop_logits(seg_ref['whole_input'])
    assert out.shape == (1, 21, 112, 112)
    torch.testing.assert_close(out, seg_ref['whole_logits'], atol=ATOL, rtol=RTOL)
    # no background channel: exactly the class channels
    seg_nobg = ZeroShotSegmentor(tiny_model, text_embedding=seg_ref['text_embedding'], with_bg=False)
    torch.testing.assert_close(seg_nobg.crop_logits(seg_ref['whole_input']), seg_ref['whole_logits'][:, 1:],
                               atol=ATOL, rtol=RTOL)


def test_crops_batched_equal_one_by_one(tiny_model, seg_ref, reference):
    seg = ZeroShotSegmentor(tiny_model, text_embedding=seg_ref['text_embedding'])
    crops = torch.cat([seg_ref['whole_input'], reference['images']])            # 3 different crops
    batched = seg.crop_logits(crops)
    single = torch.cat([seg.crop_logits(c[None]) for c in crops])
    torch.testing.assert_close(batched, single, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(batched[:1], seg_ref['whole_logits'], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize('batch_size', [1, 16])
def test_slide_probs_and_pred_match_fixture(tiny_model, seg_ref, batch_size):
    seg = ZeroShotSegmentor(tiny_model, text_embedding=seg_ref['text_embedding'], bg_thresh=0.8)
    probs = seg.slide_probs(seg_ref['slide_input'], crop=112, stride=112, batch_size=batch_size)
    assert probs.shape == (1, 21, 112, 176)
    torch.testing.assert_close(probs, seg_ref['slide_probs'], atol=ATOL, rtol=RTOL)
    assert torch.equal(probs.argmax(dim=1), seg_ref['slide_pred'])
    pred = seg.predict(seg_ref['slide_input'], crop=112, stride=112, batch_size=batch_size)[0]
    assert torch.equal(pred, seg_ref['slide_pred'][0])


def test_predict_resizes_to_original_size_before_argmax(tiny_model, seg_ref):
    seg = ZeroShotSegmentor(tiny_model, text_embedding=seg_ref['text_embedding'])
    logits = seg.slide_logits(seg_ref['slide_input'], crop=112, stride=112)[0]
    want = F.interpolate(logits[None], size=(150, 240), mode='bilinear', align_corners=False)[0].argmax(0)
    got = seg.predict([seg_ref['slide_input'][0]], out_sizes=[(150, 240)], crop=112, stride=112)[0]
    assert got.shape == (150, 240) and torch.equal(got, want)


def test_several_images_of_different_sizes_batched(tiny_model, seg_ref, reference):
    seg = ZeroShotSegmentor(tiny_model, text_embedding=seg_ref['text_embedding'])
    imgs = [seg_ref['slide_input'][0], reference['images'][1], reference['images_2x'][0][:, :, :176]]
    together = seg.slide_logits(imgs, crop=112, stride=112, batch_size=5)
    for img, lg in zip(imgs, together):
        alone = seg.slide_logits([img], crop=112, stride=112, batch_size=1)[0]
        torch.testing.assert_close(lg, alone, atol=ATOL, rtol=RTOL)


def test_slide_windows_follow_mmseg():
    # 299 wide, crop/stride 224: 2 columns, the last shifted back inside the image
    assert slide_windows(224, 299) == [(0, 224, 0, 224), (0, 224, 75, 299)]
    assert slide_windows(224, 224) == [(0, 224, 0, 224)]
    # a side smaller than the crop: one window spanning it
    assert slide_windows(100, 500, 224, 224) == [(0, 100, 0, 224), (0, 100, 224, 448), (0, 100, 276, 500)]
    # overlapping stride
    assert slide_windows(112, 176, 112, 32) == [(0, 112, 0, 112), (0, 112, 32, 144), (0, 112, 64, 176)]


def test_template_sets_and_ensemble(tiny_model):
    assert len(TEMPLATES['full']) == 80 and len(set(TEMPLATES['full'])) == 80
    assert len(TEMPLATES['subset']) == 7 and set(TEMPLATES['subset']) <= set(TEMPLATES['full'])
    assert TEMPLATES['simple'] == ['a photo of a {}.'] and TEMPLATES['identity'] == ['{}']
    with pytest.raises(ValueError, match='unknown template set'):
        get_templates('fancy')
    names = ['cat', 'potted plant']
    emb = build_text_embedding(tiny_model, names, 'subset')
    with torch.no_grad():   # independent: encode every prompt, mean over prompts, then normalise
        raw = tiny_model.encode_text(tokenize([t.format(n) for n in names for t in TEMPLATES['subset']]))
    want = F.normalize(raw.reshape(2, 7, -1).mean(1), dim=-1)
    torch.testing.assert_close(emb, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize('names, msg', [(['cat', ''], 'empty name'), (['cat', 'dog', 'cat'], 'duplicate')])
def test_bad_class_names_rejected(tiny_model, names, msg):
    with pytest.raises(ValueError, match=msg):
        ZeroShotSegmentor(tiny_model, class_names=names)


def test_window_not_multiple_of_patch_drops_remainder_like_2022(tiny_model, seg_ref):
    """An image thinner than the crop gives a window of its own size; the model sees the patch-aligned part and
    the assignment map is spread over the whole window."""
    seg = ZeroShotSegmentor(tiny_model, text_embedding=seg_ref['text_embedding'])
    img = seg_ref['slide_input'][:, :, :100, :]                          # 100 = 6 patches + 4 pixels
    probs = seg.slide_probs(img, crop=112, stride=112)
    assert probs.shape == (1, 21, 100, 176)
    soft, groups, embed = seg.encode(img[:, :, :96, :112])
    want = seg.head(soft, groups, embed, size=(100, 112))
    torch.testing.assert_close(seg.crop_logits(img[:, :, :, :112]), want)
