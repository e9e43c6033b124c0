"""The inference paths on a GPU (skipped where CUDA is absent; benchmarks/gpu_check.sh runs this module).

- the 2022 parity fixtures on CUDA in fp32, at the CPU tolerances (TF32 off);
- bf16 and fp16 autocast forward + backward: finite and close to fp32; --precision bf16 inference close to fp32;
- the evaluation on CUDA against the CPU prediction, pixel for pixel (the count of differing pixels is reported);
- the evaluation under ``torchrun --nproc_per_node 1`` with NCCL equals the single process;
- the evaluation loader pins its batches, and the images then reach the GPU without a pageable copy.
Training on the GPU (steps with --amp bf16 / fp16, GradScaler, NCCL training) is in tests/test_cuda_train.py.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

ATOL, RTOL = 1e-5, 1e-4          # the CPU parity tolerances (tests/test_model_parity.py, tests/test_seg_inference.py)
LOSS_TOL = 1e-4
SMALL = ['--resolution', '112', '--crop_size', '112', '--stride', '112']
CUDA = torch.device('cuda')


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 would round matrix products and convolutions to 10-bit mantissas: parity needs true fp32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture()
def cuda_model(reference):
    from modules.modeling import SegCLIP
    return SegCLIP.from_state_dict(reference['segclip_state_dict']).to(CUDA).eval()


def close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------- parity in fp32
@pytest.mark.parametrize('res', ['res1x', 'res2x'])
def test_eval_outputs_match_the_fixture_on_cuda(reference, cuda_model, res):
    images = (reference['images'] if res == 'res1x' else reference['images_2x']).to(CUDA)
    expected = reference['eval'][res]
    with torch.no_grad():
        out = cuda_model.encode_image(images)
    close(out.image_embed, expected['image_embed'])
    close(torch.cat([out.image_embed[:, None], out.group_embeds], dim=1), expected['tokens'])
    close(out.soft_attn, expected['soft_attn'])
    assert torch.equal(out.hard_attn.cpu(), expected['hard_attn'])
    with torch.no_grad():
        close(cuda_model.encode_text(reference['train_text']['input_ids'].to(CUDA)), reference['eval']['text_embed'])


def test_training_losses_and_gradients_match_the_fixture_on_cuda(reference):
    from modules.modeling import SegCLIP
    model = SegCLIP.from_state_dict(reference['segclip_state_dict']).to(CUDA).train()
    t, inputs = reference['train'], reference['train_inputs']
    losses = model.compute_losses(reference['train_text']['input_ids'].to(CUDA), inputs['image'][:, 0].to(CUDA),
                            superpixels=inputs['image_seg'][:, 0].to(CUDA),
                            gumbel_noise=(t['gumbel_samples'][0].to(CUDA), t['gumbel_samples'][1].to(CUDA)),
                            mae_noise=t['mae_noise'].to(CUDA))
    for name in ('contrastive', 'kl', 'mae'):
        close(losses[name], t['losses'][name], atol=LOSS_TOL, rtol=LOSS_TOL)
    losses['total'].backward()
    params = dict(model.named_parameters())
    for name, grad in t['grads'].items():
        close(params[name].grad, grad, atol=LOSS_TOL, rtol=LOSS_TOL)


def test_zero_shot_head_matches_the_fixture_on_cuda(cuda_model, reference):
    from seg_segmentation.inference import ZeroShotSegmentor
    seg_ref = reference['seg']
    seg = ZeroShotSegmentor(cuda_model, text_embedding=seg_ref['text_embedding'], bg_thresh=0.8)
    close(seg.crop_logits(seg_ref['whole_input']), seg_ref['whole_logits'])
    probs = seg.slide_probs(seg_ref['slide_input'], crop=112, stride=112)
    close(probs, seg_ref['slide_probs'])
    assert torch.equal(probs.argmax(dim=1).cpu(), seg_ref['slide_pred'])
    close(ZeroShotSegmentor(cuda_model, class_names=reference['config']['class_names']).text_embedding,
          seg_ref['text_embedding'])


# ---------------------------------------------------------------------------------------------- half precision
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_forward_backward_finite_and_close_to_fp32(reference, dtype):
    from modules.modeling import SegCLIP
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip('this GPU has no bf16')
    t, inputs = reference['train'], reference['train_inputs']
    args = (reference['train_text']['input_ids'].to(CUDA), inputs['image'][:, 0].to(CUDA))
    kw = dict(superpixels=inputs['image_seg'][:, 0].to(CUDA),
              gumbel_noise=(t['gumbel_samples'][0].to(CUDA), t['gumbel_samples'][1].to(CUDA)),
              mae_noise=t['mae_noise'].to(CUDA))
    grads = {}
    for tag, ctx in (('fp32', torch.autocast('cuda', enabled=False)), ('half', torch.autocast('cuda', dtype=dtype))):
        model = SegCLIP.from_state_dict(reference['segclip_state_dict']).to(CUDA).train()
        with ctx:
            losses = model.compute_losses(*args, **kw)
        losses['total'].backward()
        grads[tag] = (losses, {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    (l32, g32), (l16, g16) = grads['fp32'], grads['half']
    for name in ('contrastive', 'kl', 'mae', 'total'):
        assert torch.isfinite(l16[name]).all(), name
        torch.testing.assert_close(l16[name].float(), l32[name], atol=0.05, rtol=0.05)
    assert set(g16) == set(g32)
    for name in g32:
        assert torch.isfinite(g16[name]).all(), name
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    flat16 = torch.cat([g16[n].flatten() for n in g32])
    cos = torch.nn.functional.cosine_similarity(flat32, flat16, dim=0).item()
    assert cos > 0.98, cos


def test_bf16_precision_inference_close_to_fp32_on_cuda(cuda_model, reference):
    from modules.precision import set_precision
    from seg_segmentation.inference import ZeroShotSegmentor
    seg_ref = reference['seg']
    pred32 = ZeroShotSegmentor(cuda_model, text_embedding=seg_ref['text_embedding']).predict(
        seg_ref['slide_input'], crop=112, stride=112)[0]
    bf16 = set_precision(cuda_model, 'bf16')
    pred16 = ZeroShotSegmentor(bf16, text_embedding=seg_ref['text_embedding']).predict(
        seg_ref['slide_input'], crop=112, stride=112)[0]
    agree = (pred16 == pred32).double().mean().item()
    print(f'bf16 vs fp32 pixel agreement on the fixture input (CUDA): {agree:.4f}')
    assert agree > 0.99


# ---------------------------------------------------------------------------------------------- evaluation
def _predictions(model, root, device, **kw):
    from seg_segmentation.evaluate import run_zero_shot_eval
    preds = {}
    res = run_zero_shot_eval(model, dataset='voc', data_root=str(root), resolution=112, crop=112, stride=112,
                             num_workers=1, batch_size=4, progress=False, device=device,
                             on_prediction=lambda p, pred: preds.__setitem__(p, pred.numpy()), **kw)
    return res, preds


def test_evaluation_on_cuda_equals_the_cpu_prediction(reference, tmp_path):
    from modules.modeling import SegCLIP
    from tests.helpers import write_fake_dataset
    root = write_fake_dataset('voc', tmp_path / 'VOC2012', num_images=6, size=(200, 150), seed=7)
    model = SegCLIP.from_state_dict(reference['segclip_state_dict']).eval()
    cpu, cpu_preds = _predictions(model, root, 'cpu')
    gpu, gpu_preds = _predictions(model, root, 'cuda')
    assert set(cpu_preds) == set(gpu_preds)
    differing = sum(int((cpu_preds[k] != gpu_preds[k]).sum()) for k in cpu_preds)
    total = sum(v.size for v in cpu_preds.values())
    print(f'evaluation CUDA vs CPU: {differing} of {total} pixels differ; mIoU {gpu["mIoU"]:.4f} vs {cpu["mIoU"]:.4f}')
    assert differing <= total * 1e-4, f'{differing} of {total} pixels differ'
    assert abs(gpu['mIoU'] - cpu['mIoU']) < 0.05


def test_evaluation_loader_pins_its_batches(reference, tmp_path):
    from seg_segmentation.datasets import ZeroShotSegDataset
    from seg_segmentation.evaluate import EvalConfig, make_loader
    from tests.helpers import write_fake_dataset
    root = write_fake_dataset('voc', tmp_path / 'VOC2012', num_images=2, size=(120, 90), seed=8)
    shard = ZeroShotSegDataset('voc', str(root), resolution=112)
    (sample,) = next(iter(make_loader(shard, EvalConfig(num_workers=1), CUDA)))
    assert sample['img'].is_pinned() and sample['gt'].is_pinned()
    (sample,) = next(iter(make_loader(shard, EvalConfig(num_workers=0), torch.device('cpu'))))
    assert not sample['img'].is_pinned()


def test_torchrun_nccl_evaluation_equals_one_process(tmp_path, repo_root, tiny_checkpoint):
    from tests.helpers import write_fake_dataset
    root = write_fake_dataset('voc', tmp_path / 'VOC2012', num_images=3, size=(160, 120), seed=9)
    common = ['--dataset', 'voc', '--data_root', root, '--init_model', tiny_checkpoint, '--num_workers', '0',
              '--no_progress', '--device', 'cuda'] + SMALL
    env = dict(os.environ)
    env.pop('WORLD_SIZE', None)
    script = str(repo_root / 'main_seg_zeroshot.py')
    one = subprocess.run([sys.executable, script] + [str(a) for a in common + ['--output', tmp_path / 'one.json']],
                         cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1',
                          script, '--dist_backend', 'nccl'] + [str(a) for a in common + ['--output', tmp_path / 'ddp.json']],
                         cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = (json.loads(Path(tmp_path / f).read_text()) for f in ('one.json', 'ddp.json'))
    assert a['areas'] == b['areas'] and a['mIoU'] == b['mIoU'] and a['images'] == b['images'] == 3
