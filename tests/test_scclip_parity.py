"""SC-CLIP (seg_segmentation/methods/scclip.py, design.md §13.3) against outputs recorded from SC-CLIP's own code.

Fixture ``tests/fixtures/scclip_reference.pt``: fields copied unchanged from the recorded
``scclip_reference_public.pt`` (SuleBai/SC-CLIP at ``config.commit``, CPU, float32, a tiny 12-block CLIP):
``visual_state_dict`` (its 98 conv / linear / projection tensors stored float16, exactly the values clip.load
rounds them to; the rest float32); from ``encode``: the inputs ``images_224`` [2,3,224,224], ``images_336``
[1,3,336,336], ``images_nonsq`` [1,3,224,240] with ``dense_*`` (features of each image alone), ``outlier_idx_*``,
``outlier_rc_*`` ((row, col) as the original maps them) and ``lof_scores_336``; ``steps`` (``encode.steps``: the
intermediates of ``images_224[0]``); ``text`` (queries of ``config.name_lines``); ``pipeline`` (input, sizes,
``window_boxes``, ``window_features``, ``slide_logits``); ``cases`` (``pipeline.cases`` without context60's
``seg_logits``, which equal default's: same scale, no area threshold); ``ambiguous_px`` (``pipeline.checks``);
``presets`` (part of each dataset's entry) and ``published`` (``config.published_miou_vitb16``). The text tower
is the SegCLIP fixture's (``reference``).

Tolerances are the method doc's: features 1e-5, intermediates 1e-5 x max(1, max|ref|), LOF scores 1e-5 relative,
logits 1e-4, outliers and labels exact (labels outside the recorded near-tie pixels).
"""
import copy

import pytest
import torch

from common.errors import UsageError
from modules.clip import CLIP, round_weights_like_clip_load
from modules.precision import set_precision
from seg_segmentation.dense import TrainingFreeSegmentor
from seg_segmentation.inference import slide_windows
from seg_segmentation.methods import METHODS, build_method, scclip
from seg_segmentation.methods.scclip import SCCLIP, layer_rule, lof_scores, repair
from tests.conftest import FIXTURES, SCLIP_REFERENCE_PT

FEATURES, LOGITS = dict(atol=1e-5, rtol=0), dict(atol=1e-4, rtol=0)
DATASETS = {'VOC21': 'voc', 'Context60': 'context', 'COCO-Object': 'coco', 'VOC20': 'voc20', 'Context59': 'context59',
            'COCO-Stuff164k': 'coco_stuff', 'Cityscapes': 'cityscapes', 'ADE20K': 'ade20k'}


@pytest.fixture(scope='module')
def ref():
    return torch.load(FIXTURES / 'scclip_reference.pt', map_location='cpu', weights_only=True)


def tiny_clip(reference, visual_state_dict):
    sd = {k: v for k, v in reference['clip_state_dict'].items() if not k.startswith('visual.')}
    sd.update({k: v.float() for k, v in visual_state_dict.items()})
    return round_weights_like_clip_load(CLIP.from_state_dict(sd)).eval()   # clip.load's rounding (text tower)


@pytest.fixture(scope='module')
def method(reference, ref):
    return build_method('scclip', tiny_clip(reference, ref['visual_state_dict']))


def features(method, images, steps=None):
    with torch.no_grad():
        return method.dense_features(images, [None] * len(images), steps=steps).flatten(1, 2)   # [B, N, D]


def test_weights_are_the_recorded_ones(reference, ref, method):
    """The float16-stored tensors are what clip.load computes with: rounding them again changes nothing."""
    assert method.depth == ref['config']['vision_layers'] == 12
    state = method.clip.state_dict()
    for k, v in ref['visual_state_dict'].items():
        assert torch.equal(state[k], v.float()), k
    assert sum(v.dtype == torch.float16 for v in ref['visual_state_dict'].values()) == 98


@pytest.mark.parametrize('images, dense', [('images_224', 'dense_224'), ('images_336', 'dense_336')])
def test_dense_features_each_image_alone(method, ref, images, dense):
    enc = ref['encode']
    for i in range(len(enc[images])):
        out = features(method, enc[images][i:i + 1])
        torch.testing.assert_close(out[0], enc[dense][i], **FEATURES)


def test_every_intermediate(method, ref):
    s, steps = ref['steps'], {}
    features(method, ref['encode']['images_224'][:1], steps)
    ours = dict(block3_out=steps['f_post'], block8_out=steps['f_pre'], block10_out=steps['f_last'],
                repaired10=steps['y'], repaired8=steps['pre'], mid_simi=steps['mid_simi'], pre_attn_tokens=steps['y1'],
                attn_main=steps['attn'], main_out=steps['main'], multi_sum=steps['multi'], multi_out=steps['fused'])
    for name, value in ours.items():
        r = s[name].float()
        torch.testing.assert_close(value[0], r, atol=1e-5 * max(1.0, r.abs().max().item()), rtol=0, msg=name)
    torch.testing.assert_close(steps['lof_scores'][0], s['lof_scores'], atol=0, rtol=1e-5)
    idx = steps['outliers'][0].nonzero()[:, 0]
    assert torch.equal(idx, s['outlier_idx'])
    assert torch.equal(torch.stack([idx // 14, idx % 14], 1), s['outlier_rc'])


def test_outliers_and_the_float32_quantile(method, ref):
    """21 x 21 grid: the 0.95 quantile in float32 semantics puts 23 tokens above it (a float64 quantile: 22)."""
    enc, steps = ref['encode'], {}
    features(method, enc['images_336'], steps)
    scores = steps['lof_scores'][0]
    torch.testing.assert_close(scores, enc['lof_scores_336'], atol=0, rtol=1e-5)
    idx = steps['outliers'][0].nonzero()[:, 0]
    assert torch.equal(idx, enc['outlier_idx_336']) and len(idx) == 23
    assert torch.equal(torch.stack([idx // 21, idx % 21], 1), enc['outlier_rc_336'])
    assert (scores.double() > torch.quantile(scores.double(), 0.95)).sum() == 22
    features(method, enc['images_224'][1:], steps)
    assert torch.equal(steps['outliers'][0].nonzero()[:, 0], enc['outlier_idx_224_1'])


def test_lof_is_the_own_k_distance_variant():
    """lof_scores (candidates by the Gram expansion, refined by difference vectors) = the definition written out,
    also with fewer tokens than neighbours (k shrinks to N - 1)."""
    g = torch.Generator().manual_seed(0)
    for n in (200, 20, 2):
        x = torch.randn(n, 16, generator=g) * torch.rand(n, 1, generator=g) * 3
        k = min(30, n - 1)
        d = torch.linalg.vector_norm(x[:, None] - x[None], dim=-1) ** 2
        dist, nbr = d.topk(k + 1, largest=False)
        kd = dist[:, -1]                      # p's own k-distance: every reach distance of p
        expected = (kd[:, None] / kd[nbr[:, 1:]]).mean(-1)
        torch.testing.assert_close(lof_scores(x), expected, rtol=1e-5, atol=0)
    assert torch.equal(lof_scores(torch.randn(1, 16)), torch.ones(1))


def original_cells(outliers, grid):
    """The original's cells for flat outlier indices: (i // G_r, i % G_r) - both by the number of rows."""
    rows, cols = grid
    wrong = torch.zeros_like(outliers)
    for b, i in outliers.nonzero().tolist():
        wrong[b, (i // rows) * cols + i % rows] = True
    return wrong


def test_non_square_grid(method, ref, monkeypatch):
    """14 x 15 grid: the outliers are the recorded ones, and the repair changes exactly the cells (i // 15, i % 15)
    to the mean of their inlier 8-neighbours. The original repairs (i // 14, i % 14) instead; with that mapping
    swapped in, the features are the recorded ones - nothing else differs."""
    enc, steps = ref['encode'], {}
    image = enc['images_nonsq']
    out = features(method, image, steps)
    idx = steps['outliers'][0].nonzero()[:, 0]
    assert torch.equal(idx, enc['outlier_idx_nonsq'])
    assert torch.equal(torch.stack([idx // 14, idx % 14], 1), enc['outlier_rc_nonsq'])
    before, after = steps['f_last'][0, 1:].view(14, 15, -1), steps['y'][0].view(14, 15, -1)
    out_rc = {(i // 15, i % 15) for i in idx.tolist()}
    changed = {(r, c) for r in range(14) for c in range(15) if not torch.equal(before[r, c], after[r, c])}
    assert changed == out_rc
    for r, c in out_rc:
        near = [before[r + dr, c + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr or dc)
                and 0 <= r + dr < 14 and 0 <= c + dc < 15 and (r + dr, c + dc) not in out_rc]
        torch.testing.assert_close(after[r, c], torch.stack(near).mean(0), atol=1e-5, rtol=0)
    assert (out - enc['dense_nonsq']).abs().max() > 1e-3          # the corrected cells change the features
    monkeypatch.setattr(scclip, 'repair', lambda t, o, grid: repair(t, original_cells(o, grid), grid))
    torch.testing.assert_close(features(method, image), enc['dense_nonsq'], **FEATURES)


def test_batch_equals_one_at_a_time(method, ref):
    """Per-image outlier detection: a batch gives each image's own features (to float noise, 1e-5: the block
    matrix products may round differently with another batch size), also with different outlier counts in one
    batch (23 and 22 on these two 21 x 21 grids)."""
    enc = ref['encode']
    a = enc['images_336']
    pair, steps = torch.cat([a, a.flip(-2)]), {}
    batched = features(method, pair, steps)
    assert steps['outliers'].sum(1).tolist() == [23, 22]
    for i in range(2):
        torch.testing.assert_close(batched[i], features(method, pair[i:i + 1])[0], **FEATURES)
    torch.testing.assert_close(features(method, enc['images_224']), enc['dense_224'], **FEATURES)


@pytest.fixture(scope='module')
def segmentor(method, ref):
    p = ref['pipeline']
    return TrainingFreeSegmentor(method, name_lines=ref['config']['name_lines'], templates='full', crop=p['crop'],
                                 stride=p['stride'])


@pytest.fixture(scope='module')
def slide_logits(segmentor, ref):
    """The pipeline input's window-averaged logits at the original size [1, Q, H, W] (shared by every case)."""
    p = ref['pipeline']
    return segmentor.query_logits(p['input'], p['ori_shape'])


def with_case(segmentor, case):
    """The segmentor with a case's head settings (same queries: the text is encoded once)."""
    seg = copy.copy(segmentor)
    seg.logit_scale, seg.prob_thd, seg.area_thd = float(case['logit_scale']), float(case['prob_thd']), case['area_thd']
    return seg


def test_query_features(segmentor, ref):
    queries = segmentor.queries
    assert queries.words == ref['text']['query_words']
    assert torch.equal(queries.index, ref['text']['query_idx'])
    torch.testing.assert_close(queries.features, ref['text']['query_features'], **FEATURES)


def test_window_features_batched(method, ref):
    """The six windows of the pipeline input in one batch."""
    p = ref['pipeline']
    boxes = slide_windows(*p['input'].shape[-2:], p['crop'], p['stride'])
    assert torch.equal(torch.tensor(boxes), p['window_boxes'])
    crops = torch.cat([p['input'][..., y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
    torch.testing.assert_close(features(method, crops), p['window_features'], **FEATURES)


def test_slide_logits(slide_logits, ref):
    torch.testing.assert_close(slide_logits, ref['pipeline']['slide_logits'], **LOGITS)


@pytest.mark.parametrize('case', ['voc21', 'context60', 'coco_object', 'default'])
def test_protocol(segmentor, slide_logits, ref, case):
    c = ref['cases'][case]
    seg_logits, seg_pred = with_case(segmentor, c).postprocess(slide_logits[0])
    expected = c['seg_logits'] if 'seg_logits' in c else ref['cases']['default']['seg_logits']
    torch.testing.assert_close(seg_logits, expected, **LOGITS)
    # exact labels except where the recording itself is within 1e-4 of a tie or of prob_thd
    top2 = expected.topk(2, dim=0).values
    ambiguous = ((top2[0] - top2[1]) < 1e-4) | ((top2[0] - c['prob_thd']).abs() < 1e-4)
    assert ambiguous.sum() == ref['ambiguous_px'][case]
    assert torch.equal(seg_pred[0][~ambiguous], c['seg_pred'][0].long()[~ambiguous])


def test_images_of_different_sizes_batched(segmentor, ref):
    """Windows of several images pooled into batches (two window sizes: 224 x 224 and, from images narrower than
    the crop, 224 x 208 and 224 x 192 - non-square grids) = each image alone, to float noise (1e-5)."""
    enc = ref['encode']
    nonsq, one = enc['images_nonsq'][0], enc['images_224'][1]
    images = [nonsq, one, nonsq[..., :208], one[..., 16:208]]
    together = segmentor.slide_logits(images, batch_size=16)
    for img, lg in zip(images, together):
        torch.testing.assert_close(lg, segmentor.slide_logits([img], batch_size=1)[0], **FEATURES)


def test_bf16_agreement(method, segmentor, slide_logits, ref):
    """--precision bf16 on the pipeline input (VOC21 head): pixel agreement with fp32 (measured: design.md
    §13.3)."""
    p, c = ref['pipeline'], ref['cases']['voc21']
    labels32 = with_case(segmentor, c).postprocess(slide_logits[0])[1]
    low = set_precision(copy.deepcopy(method), 'bf16')
    bf16 = TrainingFreeSegmentor(low, name_lines=ref['config']['name_lines'], templates='full', crop=p['crop'],
                                 stride=p['stride'], logit_scale=c['logit_scale'], prob_thd=c['prob_thd'],
                                 area_thd=c['area_thd'])
    labels16 = bf16.predict(p['input'], p['ori_shape'])[1]
    agree = (labels16 == labels32).float().mean().item()
    print(f'scclip bf16 vs fp32 pixel agreement on the fixture pipeline input: {agree:.4f}')
    assert agree > 0.99, agree


def test_presets_and_published_numbers(ref):
    """Every dataset's preset is SC-CLIP's config (slide 224/112, no PAMR, the layer knobs of ViT-B/16)."""
    for name, cfg in ref['presets'].items():
        s = SCCLIP.settings(DATASETS[name])
        assert (s['resolution'], s['crop'], s['stride'], s['pamr_steps']) == \
            (cfg['short_side'], cfg['slide_crop'], cfg['slide_stride'], cfg['pamr_steps']), name
        assert (s['logit_scale'], s['prob_thd'], s['area_thd']) == \
            (cfg['logit_scale'], cfg['prob_thd'], cfg['area_thd']), name
        assert layer_rule(12) == {k: cfg[k] for k in layer_rule(12)}, name
        assert SCCLIP.published[DATASETS[name]] == ref['published'][name]
    assert METHODS['scclip'] is SCCLIP and ref['config']['knobs'] == layer_rule(12)


def test_layer_rule_for_other_depths(reference, method):
    assert layer_rule(24) == dict(pre_adjust_idx=16, post_adjust_idx=6, multi_start_idx=8, multi_end_idx=19,
                                  res_cls=0.1)
    assert layer_rule(4) == dict(pre_adjust_idx=2, post_adjust_idx=1, multi_start_idx=1, multi_end_idx=3, res_cls=0.3)
    assert layer_rule(32) == dict(pre_adjust_idx=21, post_adjust_idx=8, multi_start_idx=8, multi_end_idx=26,
                                  res_cls=0.3)
    # a 4-block CLIP (the SCLIP fixture's) runs with the scaled indices
    four = build_method('scclip', tiny_clip(reference, torch.load(SCLIP_REFERENCE_PT, weights_only=True)
                                            ['visual_state_dict']))
    assert four.depth == 4 and four.knob_values() == layer_rule(4)
    steps = {}
    out = features(four, torch.randn(1, 3, 224, 224), steps)
    assert out.shape == (1, 196, 32) and torch.isfinite(out).all()
    assert steps['f_pre'] is steps['f_last']           # pre_adjust_idx 2: the last block output computed
    # explicit indices win; out of range: one-line usage errors
    assert build_method('scclip', method.clip, pre_adjust_idx=5).knob_values()['pre_adjust_idx'] == 5
    with pytest.raises(UsageError, match=r'^scclip: pre_adjust_idx 11 is not a block output of this 12-block CLIP '
                                         r'\(0 \.\.\. 10\)$'):
        build_method('scclip', method.clip, pre_adjust_idx=11)
    with pytest.raises(UsageError, match='multi_end_idx 3 must be above multi_start_idx 3'):
        build_method('scclip', method.clip, multi_end_idx=3)


def test_too_shallow_for_the_rule(reference, ref):
    """3 blocks: the rule has no indices; one line saying so, and explicit indices run."""
    vsd = {k: v for k, v in ref['visual_state_dict'].items() if not k.startswith('visual.transformer.resblocks.')
           or int(k.split('.')[3]) < 3}
    clip = tiny_clip(reference, vsd)
    shallow = build_method('scclip', clip)
    with pytest.raises(UsageError, match='this CLIP has 3 blocks, too few for the layer rule') as e:
        features(shallow, torch.randn(1, 3, 224, 224))
    assert '\n' not in str(e.value)
    given = build_method('scclip', clip, pre_adjust_idx=1, post_adjust_idx=0, multi_start_idx=0, multi_end_idx=2)
    assert features(given, torch.randn(1, 3, 224, 224)).shape == (1, 196, 32)
