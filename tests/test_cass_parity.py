"""CASS (design.md §13.5) against outputs recorded from CASS's own code (MICV-yonsei/CASS at 228ecdd, CPU, one
thread) with a tiny CLIP (4 blocks, width 128, 2 heads, patch 16) and a tiny DINO (4 blocks, width 128, patch 8).

The fixtures were cut from the recorded ``cass_reference_public.pt`` by a one-off script:
- ``cass_clip_visual.pt``: ``visual_state_dict`` after clip.load's fp16 rounding (the rounded tensors stored as
  float16, the others float32); the text tower is the SegCLIP fixture's (non-``visual.`` keys of
  ``clip_state_dict``).
- ``cass_dino.pt``: ``dino_state_dict`` (float16, the exact weights) and ``config.dino``.
- ``cass_reference.pt``: ``config`` (svd_seed, name_lines, pixel mean / std), ``presets`` (the fields of CASS's
  eight configs used here), ``text``; ``pixels_224`` = ``encode.images_224`` as the uint8 pixels it was normalised
  from; ``dense_224``, ``dense_224_voc20``, ``global_224``; ``stages`` = ``encode.intermediates_224_0`` (combined /
  distilled attention: every 4th row).
- ``cass_large_reference.pt``: ``pixels`` = ``pipeline.input`` = ``encode.images_large`` as uint8 pixels,
  ``ori_shape``, ``dense_large``, ``global_large``, ``stages`` = ``encode.intermediates_large``; ``cases`` =
  ``pipeline.cases`` with the per-window lists stacked (``window_assignment``: its second row, σ), ``seg_logits``
  every 4th row and column, ``ambiguous``: flat indices of the pixels whose recorded top-2 gap or distance to
  ``prob_thd`` is below 1e-4 (their label may differ).
"""
import itertools

import pytest
import torch

from modules.clip import CLIP, round_weights_like_clip_load
from modules.precision import set_precision
from seg_segmentation.dense import TrainingFreeSegmentor
from seg_segmentation.inference import slide_windows
from seg_segmentation.methods import build_method
from seg_segmentation.methods import cass
from seg_segmentation.methods.naclip import neighbourhood_bias
from tests.conftest import FIXTURES

FEATURES, LOGITS = dict(atol=1e-5, rtol=0), dict(atol=1e-4, rtol=0)
SPECTRA = dict(rtol=1e-9, atol=0)
DATASETS = dict(voc21='voc', context60='context', coco_object='coco', voc20='voc20', context59='context59',
                coco_stuff164k='coco_stuff', city_scapes='cityscapes', ade20k='ade20k')


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """The recording ran on one thread; LAPACK's eigenvalues change in the last bits with the thread count (and a
    busy machine makes multi-threaded small LAPACK calls very slow)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def ref():
    return torch.load(FIXTURES / 'cass_reference.pt', weights_only=True)


@pytest.fixture(scope='module')
def large():
    return torch.load(FIXTURES / 'cass_large_reference.pt', weights_only=True)


def normalised(pixels, ref):
    mean = torch.tensor(ref['config']['pixel_mean']).view(3, 1, 1)
    std = torch.tensor(ref['config']['pixel_std']).view(3, 1, 1)
    return (pixels.float() - mean) / std


@pytest.fixture(scope='module')
def images(ref, large):
    return dict(small=normalised(ref['pixels_224'], ref), large=normalised(large['pixels'], ref))


@pytest.fixture(scope='module')
def clip(reference):
    sd = {k: v for k, v in reference['clip_state_dict'].items() if not k.startswith('visual.')}
    sd.update({k: v.float() for k, v in
               torch.load(FIXTURES / 'cass_clip_visual.pt', weights_only=True)['visual_state_dict'].items()})
    # CASS loads CLIP through clip.load on the CPU: conv / linear / projection weights rounded to fp16, run in fp32
    return round_weights_like_clip_load(CLIP.from_state_dict(sd)).eval()


@pytest.fixture(scope='module')
def dino():
    from modules.vfm import VisionTransformerVFM
    sd = torch.load(FIXTURES / 'cass_dino.pt', weights_only=True)['dino_state_dict']
    return VisionTransformerVFM.from_state_dict({k: v.float() for k, v in sd.items()}).eval()


@pytest.fixture
def method(clip, dino):
    """A fresh method (its knobs at their defaults) around the shared models."""
    return build_method('cass', clip, vfm=dino)


def states(method, crops):
    return [method.prepare_image(c) for c in crops]


def clip_keys(clip, crops):
    """CLIP's last-block patch keys [B, H, n, hd] (float32)."""
    last = clip.visual.transformer.resblocks[-1]
    with torch.no_grad():
        _, k, _ = last.attn.qkv_heads(last.ln_1(clip.visual.tokens_before_last(crops)))
    return k[:, :, 1:].float()


# ---------------------------------------------------------------------- settings and text
def test_presets_are_cass_configs(ref):
    for name, p in ref['presets'].items():
        s = cass.CASS.settings(DATASETS[name])
        assert s['resolution'] == p['resize_scale'][1] and s['stride'] == p['slide_stride'], name
        assert s['crop'] == (0 if p['mode'] == 'whole' else p['slide_crop']), name
        assert (s['prob_thd'], s['logit_scale'], s['gaussian_std'], s['pamr_steps']) == \
            (p['prob_thd'], p['logit_scale'], p['gaussian_std'], 0), name
        assert (s['global_semantics_weight'], s['mean_vector_weight'], s['h_threshold']) == \
            (p['global_semantics_weight'], p['mean_vector_weight'], p['h_threshold']), name
        assert s['eigen_scaling'] == p['singular_value_scaling'], name
        # whole-image mode takes the window's own embedding, which is then the whole image's
        expected = 'window' if p['global_cls_from'] == 'the window itself' and p['mode'] == 'slide' else 'image'
        assert s['global_from'] == expected, name
        assert s['area_thd'] is None and s['templates'] == 'full' and s['svd_seed'] == ref['config']['svd_seed']
    assert set(cass.CASS.published) == set(DATASETS.values())
    assert abs(sum(cass.CASS.published.values()) / 8 - 44.4) < 0.06     # the paper's mean, from unrounded numbers


def test_query_features_and_clusters(method, ref, large):
    seg = TrainingFreeSegmentor(method, name_lines=ref['config']['name_lines'])
    assert seg.queries.words == ref['text']['query_words']
    assert torch.equal(seg.queries.index, ref['text']['query_idx'])
    torch.testing.assert_close(seg.queries.features, ref['text']['query_features'], **FEATURES)
    for name, case in large['cases'].items():
        labels = cass.cluster_queries(seg.queries.features, case['settings']['h_threshold'])
        assert labels.tolist() == case['cluster_info'].tolist(), name
    assert sorted(cass.cluster_queries(seg.queries.features, 1e-6).tolist()) == list(range(10))   # each alone


# ---------------------------------------------------------------------- stages, from the recorded DINO keys
def test_dino_input(ref, large, images):
    """CLIP-normalised window -> DINO's uint8 image: same-size copy at 224, PIL's bicubic squash at 336x448."""
    assert torch.equal(cass.dino_pixels(images['small'][:1])[0], ref['stages']['dino_input'])
    squashed = cass.dino_pixels(images['large'])[0]
    assert squashed.shape == (336, 336, 3)
    assert torch.equal(squashed, large['stages']['dino_input'])


def test_dino_keys_to_graph(clip, ref, images):
    """Recorded DINO keys -> the fp16 keys on CLIP's grid and the fp16 graph, bit for bit."""
    st = ref['stages']
    k = clip_keys(clip, images['small'][:1])
    keys = cass.match_key_range(cass.keys_on_clip_grid(st['dino_keys'][None, :, 1:], 2, (14, 14)), k)
    assert keys.dtype == torch.float16
    assert torch.equal(keys[0].transpose(-1, -2), st['dino_key_final'])
    assert torch.equal(cass.key_graph(keys, 0.125)[0], st['dino_graph'])
    # the same keys in another memory layout (as DINO's own qkv permute leaves them) give the same bits
    strided = st['dino_keys'][None].permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)[:, :, 1:]
    assert torch.equal(cass.match_key_range(cass.keys_on_clip_grid(strided, 2, (14, 14)), k), keys)
    # the fp16 product depends on the layout: the same values multiplied contiguously differ in a few entries
    kt = st['dino_key_final'].contiguous()
    assert not torch.equal((kt @ kt.transpose(-1, -2)) * 0.125, st['dino_graph'])


def test_spectral_matching_and_distillation(clip, ref, images):
    """From the recorded DINO graph: spectra, cost, assignment (with the swap), the seeded low-rank SVD, the
    eigen-scaling, the combined and the distilled attention."""
    st = ref['stages']
    k = clip_keys(clip, images['small'][:1])[0]
    attn = (k @ k.transpose(-1, -2)) * 0.125
    eig_dino, eig_clip = cass.spectrum(st['dino_graph'], 20), cass.spectrum(attn, 20)
    torch.testing.assert_close(eig_dino, st['eig_dino'], **SPECTRA)
    torch.testing.assert_close(eig_clip, st['eig_clip'], **SPECTRA)
    torch.testing.assert_close(cass.spectral_cost(eig_dino, eig_clip), st['cost_matrix'], atol=1e-6, rtol=0)
    generator = torch.Generator().manual_seed(ref['config']['svd_seed'])
    combined, sigma, _ = cass.distill(attn, st['dino_graph'], generator)
    assert sigma.tolist() == st['assignment'][1].tolist() == [1, 0]       # the swap: CLIP head 0 takes DINO head 1
    torch.testing.assert_close(combined[:, ::4], st['combined_attn_rows'], **FEATURES)
    distilled = (combined + neighbourhood_bias(14, 14, 5.0)[1:, 1:]).softmax(dim=-1)
    torch.testing.assert_close(distilled[:, ::4], st['distilled_attn_rows'], **FEATURES)
    # the recorder's draws: one per head, in head order, from the seed
    generator = torch.Generator().manual_seed(ref['config']['svd_seed'])
    for idx, j in enumerate(sigma.tolist()):
        U, S, V = cass.low_rank(st['dino_graph'][j].double(), 10, generator)
        torch.testing.assert_close(U, st['lowrank_u'][idx], **SPECTRA)
        torch.testing.assert_close(S, st['lowrank_s'][idx], **SPECTRA)
        torch.testing.assert_close(V, st['lowrank_v'][idx], **SPECTRA)
        torch.testing.assert_close(cass.stretch_singular_values(S), st['s_scaled'][idx], **SPECTRA)
    # another seed moves the combined map: the draws matter
    other = cass.distill(attn, st['dino_graph'], torch.Generator().manual_seed(0))[0]
    assert (other - combined).abs().max() > 1e-4


def test_dense_features_from_recorded_keys(method, ref, images):
    crops = images['small'][:1]
    with torch.no_grad():
        enc = method.encode(crops, states(method, crops), dino_keys=ref['stages']['dino_keys'][None])
    torch.testing.assert_close(enc.dense.flatten(1, 2), ref['dense_224'][:1], **FEATURES)
    torch.testing.assert_close(enc.cost[0], ref['stages']['cost_matrix'], atol=1e-6, rtol=0)
    assert enc.assignment.tolist() == [ref['stages']['assignment'][1].tolist()]


# ---------------------------------------------------------------------- end to end, with the DINO model
def test_dino_keys(method, ref, images):
    with torch.no_grad():
        keys = method.dino_keys(images['small'][:1])
    torch.testing.assert_close(keys[0], ref['stages']['dino_keys'], atol=1e-6, rtol=0)


@pytest.mark.parametrize('eigen_scaling, field', [(True, 'dense_224'), (False, 'dense_224_voc20')])
def test_encode_224(method, ref, images, eigen_scaling, field):
    crops = images['small']
    method.configure(eigen_scaling=eigen_scaling)
    with torch.no_grad():
        enc = method.encode(crops, states(method, crops), own_global=True)
    torch.testing.assert_close(enc.dense.flatten(1, 2), ref[field], **FEATURES)
    torch.testing.assert_close(enc.embedding, ref['global_224'], **FEATURES)
    assert enc.assignment[0].tolist() == ref['stages']['assignment'][1].tolist()


def test_encode_whole_image(method, large, images):
    """336x448: DINO sees the image squashed to 336² (42² keys resized to CLIP's 21x28 grid)."""
    crops = images['large']
    with torch.no_grad():
        keys = method.dino_keys(crops)
        enc = method.encode(crops, states(method, crops), dino_keys=keys, own_global=True)
    assert keys.shape == (1, 2, 1 + 42 * 42, 64)
    grid_keys = cass.match_key_range(cass.keys_on_clip_grid(keys[:, :, 1:], 2, (21, 28)), clip_keys(method.clip, crops))
    assert torch.equal(grid_keys[0].transpose(-1, -2), large['stages']['dino_key_final'])
    torch.testing.assert_close(enc.dense.flatten(1, 2), large['dense_large'], **FEATURES)
    torch.testing.assert_close(enc.embedding, large['global_large'], **FEATURES)
    torch.testing.assert_close(enc.cost[0], large['stages']['cost_matrix'], atol=1e-6, rtol=0)
    assert enc.assignment[0].tolist() == large['stages']['assignment'][1].tolist()


def segmentor(method, ref, case, **kw):
    s = case['settings']
    return TrainingFreeSegmentor(method, name_lines=ref['config']['name_lines'], templates='full',
                                 logit_scale=s['logit_scale'], prob_thd=s['prob_thd'], crop=s['slide_crop'],
                                 stride=s['slide_stride'], global_semantics_weight=s['global_semantics_weight'],
                                 mean_vector_weight=s['mean_vector_weight'], h_threshold=s['h_threshold'],
                                 gaussian_std=s['gaussian_std'], global_from=GLOBAL_FROM.get(s['dataset'], 'image'),
                                 eigen_scaling=s['dataset'] not in ('voc20', 'city_scapes'), **kw)


GLOBAL_FROM = dict(city_scapes='window')      # CASS decides by the config's name; here a preset setting


@pytest.fixture(scope='module')
def runs(clip, dino, ref, large, images):
    """Per pipeline case: the segmentor, its window outputs (seen by a spy on the way) and its prediction."""
    cache = {}

    def run(name):
        if name not in cache:
            method = build_method('cass', clip, vfm=dino)
            seg = segmentor(method, ref, large['cases'][name])
            seen, window_outputs = [], method.window_outputs

            def spy(*args, **kwargs):
                seen.append(window_outputs(*args, **kwargs))
                return seen[-1]
            method.window_outputs = spy
            with torch.no_grad():
                probs, pred = seg.predict(images['large'], ori_shape=large['ori_shape'])
            cache[name] = seg, seen, probs, pred
        return cache[name]
    return run


@pytest.mark.parametrize('name', ['voc21', 'context60', 'city_scapes', 'voc20'])
def test_pipeline(large, runs, name):
    """Each case: the windows (batched; the image's SVD draws in window order), their grid logits, global
    similarities, adjusted queries and assignments, then the class probabilities and the labels."""
    case = large['cases'][name]
    seg, seen, probs, pred = runs(name)
    assert torch.equal(seg.method.clusters(seg.queries).cpu(), case['cluster_info'])
    assert len(seen) == 1                      # every window of the image in one batch
    out = seen[0]
    torch.testing.assert_close(out.logits, case['window_grid_logits'], **LOGITS)
    torch.testing.assert_close(out.global_sims, case['window_global_sim'], **LOGITS)
    torch.testing.assert_close(out.text, case['window_adjusted_text'], **FEATURES)
    assert torch.equal(out.visual.assignment, case['window_assignment'])
    torch.testing.assert_close(probs[:, ::large['step'], ::large['step']], case['seg_logits_rows_cols'], **LOGITS)
    differ = (pred != case['seg_pred'].long()).flatten().nonzero().flatten()
    assert set(differ.tolist()) <= set(case['ambiguous'].tolist())
    assert len(differ) <= len(case['ambiguous']) < 100


def test_windows_one_at_a_time(method, ref, large, images, runs):
    """One window per call, the image's generator carried from window to window, gives the batched numbers."""
    seen = runs('context60')[1]
    seg = segmentor(method, ref, large['cases']['context60'])
    image = images['large'][0]
    state = method.prepare_image(image)
    global_rng = torch.get_rng_state()
    with torch.no_grad():
        for w, (y1, y2, x1, x2) in enumerate(slide_windows(336, 448, 224, 112)):
            out = method.window_outputs(image[None, :, y1:y2, x1:x2], seg.queries, [state])
            torch.testing.assert_close(out.logits[0], seen[0].logits[w], atol=1e-6, rtol=0)
            assert torch.equal(out.visual.assignment[0], seen[0].visual.assignment[w])
    assert torch.equal(torch.get_rng_state(), global_rng)          # the global generator is never drawn from


def test_no_near_tie_assignments(method, ref, images, runs):
    """Windows whose two best head assignments cost within 1e-6 of each other (design.md §13.5: decided by float
    rounding): none among the fixture's 224 images, the 336x448 image whole and its six 224 windows."""
    with torch.no_grad():
        small = method.encode(images['small'], states(method, images['small'])).cost
    costs = torch.cat([small, runs('voc21')[1][0].visual.cost, runs('context60')[1][0].visual.cost])
    margins = []
    for cost in costs:
        totals = sorted(float(sum(cost[i, p[i]] for i in range(2))) for p in itertools.permutations(range(2)))
        margins.append(totals[1] - totals[0])
    assert len(margins) == 9
    assert sum(m < 1e-6 for m in margins) == 0 and min(margins) > 1e-3


# ---------------------------------------------------------------------- batching and precision
def test_batch_n_equals_batch_1(method, ref, large, images):
    """Windows of two images of different sizes pooled in batches == each image alone, one window per batch: the
    SVD draws come from each image's own generator in its window order, and every other step is per window.
    Equal to 1e-6 (float noise of batched CLIP matrix products; the fp16 DINO path is batch-independent)."""
    seg = segmentor(method, ref, large['cases']['context60'])
    image, other = images['large'][0], images['large'][0, :, 40:264, 60:340]      # 336x448 and 224x280
    with torch.no_grad():
        pooled = seg.slide_logits([other, image], batch_size=5)
        alone = [seg.slide_logits([img], batch_size=1)[0] for img in (other, image)]
    for a, b in zip(pooled, alone):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_global_from_image_is_computed_once(method, ref, large, images):
    """'image': the whole image's embedding, computed once per image, used by all its windows."""
    seg = segmentor(method, ref, large['cases']['context60'])
    image = images['large'][0]
    state = method.prepare_image(image)
    with torch.no_grad():
        out = method.window_outputs(image[None, :, :224, :224], seg.queries, [state])
        embedding = state.embedding
        method.window_outputs(image[None, :, 112:, 224:], seg.queries, [state])
        expected = torch.nn.functional.normalize(method.clip.encode_image(image[None]), dim=-1) @ seg.queries.features.T
    assert state.embedding is embedding
    torch.testing.assert_close(out.global_sims, expected, atol=1e-6, rtol=0)


def test_bf16_agreement(clip, dino, ref, large, images, runs):
    """--precision bf16 (the fp16 DINO path unchanged): the VOC21 case's labels against fp32."""
    import copy
    case = large['cases']['voc21']
    bf16 = set_precision(build_method('cass', copy.deepcopy(clip), vfm=copy.deepcopy(dino)), 'bf16')
    assert bf16.clip.visual.conv1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        _, b = segmentor(bf16, ref, case).predict(images['large'], ori_shape=large['ori_shape'])
    a = runs('voc21')[3]
    agreement = (a == b).float().mean().item()
    print(f'bf16 vs fp32 pixel agreement: {agreement:.4f}')
    assert agreement > 0.95


def test_few_patches_and_bad_vfm(clip, dino):
    """A window of fewer than 10 patches (CASS's rank-10 SVD crashes there) gets a lower rank; a second model of
    another width, or a DINOv2, is a one-line user error."""
    from common.errors import UsageError
    method = build_method('cass', clip, vfm=dino)
    crops = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        dense = method.dense_features(crops, [None])
    assert dense.shape == (1, 3, 3, 32) and torch.isfinite(dense).all()
    from modules.vfm import VFMConfig, VisionTransformerVFM
    narrow = VisionTransformerVFM(VFMConfig('dino', 64, 1, 8, 28, 256))      # a width-64 DINO
    with pytest.raises(UsageError, match='64 wide but CLIP is 128'):
        build_method('cass', clip, vfm=narrow)
    dinov2 = VisionTransformerVFM(VFMConfig('dinov2', 128, 1, 14, 37, 512, num_registers=4))
    with pytest.raises(UsageError, match='must be a DINO ViT .* not dinov2'):
        build_method('cass', clip, vfm=dinov2)
