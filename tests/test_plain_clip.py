"""The plain-CLIP training mode (``--plain_clip``): the CLIP stage the offline quickstart runs before SegCLIP's."""
import pytest
import torch

from modules.losses import contrastive_loss
from modules.modeling import SegCLIP
from modules.tokenization_clip import tokenize


def _images(reference, n=2):
    torch.manual_seed(0)
    res = reference["clip_state_dict"]["visual.conv1.weight"].shape[-1] * int(
        round((reference["clip_state_dict"]["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    return torch.randn(n, 3, res, res)


def test_plain_pass_is_clips_blocks_on_the_patches_max_pooled(reference):
    """forward_plain against OpenAI's own CLIP code (the clip package): every visual block on the patch tokens,
    max over tokens, ln_post, proj."""
    pytest.importorskip("clip")
    from clip.model import build_model
    oracle = build_model(dict(reference["clip_state_dict"])).float().eval()
    oracle.load_state_dict(reference["clip_state_dict"])   # build_model rounds the weights to fp16; undo that
    model = SegCLIP.from_clip(reference["clip_state_dict"], first_stage_layer=3, plain_clip=True).eval()
    images = _images(reference)
    v = oracle.visual
    with torch.no_grad():
        x = v.conv1(images).flatten(2).transpose(1, 2) + v.positional_embedding[1:]   # [B, L, W], no class token
        x = v.transformer(v.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        expected = v.ln_post(x.max(dim=1).values) @ v.proj
        got = model.clip.visual.forward_plain(model.clip.visual.embed(images)[:, 1:])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_plain_clip_losses_train_the_clip_and_leave_the_centers(reference):
    model = SegCLIP.from_clip(reference["clip_state_dict"], first_stage_layer=3, plain_clip=True)
    images = _images(reference)
    ids = tokenize(["a red circle on sand", "a blue square on grass"], context_length=16)
    losses = model.compute_losses(ids, images, superpixels=torch.zeros(2, 7, 7, dtype=torch.long))
    assert set(losses) == {"contrastive", "total"}
    with torch.no_grad():
        embed = model.clip.visual.forward_plain(model.clip.visual.embed(images)[:, 1:])
        expected = contrastive_loss(embed, model.encode_text(ids), model.logit_scale_value())
    torch.testing.assert_close(losses["total"], expected)
    losses["total"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is None for n in grads if ".semantic_layer2." in n or n.startswith("vis_mae_decoder."))
    for name in ("clip.visual.conv1.weight", "clip.visual.transformer.layers0.0.attn.in_proj_weight",
                 "clip.visual.transformer.layers2.0.mlp.c_fc.weight", "clip.visual.proj",
                 "clip.token_embedding.weight", "clip.logit_scale"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # the default (SegCLIP) pass is untouched by the mode's existence: the centers take part there
    model.config.plain_clip = False
    model.zero_grad()
    model.compute_losses(ids, images)["total"].backward()
    assert model.clip.visual.transformer.semantic_layer2.semantic_center.grad.abs().sum() > 0


def test_main_task_align_plain_clip_flag(reference, tmp_path, capsys):
    import main_task_align
    clip_file = tmp_path / "clip.pt"
    torch.save(dict(reference["clip_state_dict"]), clip_file)
    base = ["--do_pretrain", "--datatype", "cc", "--cc_store", str(tmp_path), "--output_dir", str(tmp_path / "o"),
            "--pretrained_clip_name", str(clip_file), "--first_stage_layer", "3", "--freeze_layer_num", "-1"]
    # the superpixel loss acts on the center assignment, which the plain pass does not have
    assert main_task_align.main(base + ["--plain_clip", "--use_seglabel"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--use_seglabel" in err and err.count("\n") == 1
    # CLIP's own pretraining trains its patch embedding; the SegCLIP stage keeps 2022's freezing of it
    plain = main_task_align.build_model(main_task_align.get_args(base + ["--plain_clip"]))
    seg = main_task_align.build_model(main_task_align.get_args(base))
    assert plain.config.plain_clip and not seg.config.plain_clip
    for name in ("clip.visual.conv1.weight", "clip.visual.positional_embedding"):
        assert dict(plain.named_parameters())[name].requires_grad
        assert not dict(seg.named_parameters())[name].requires_grad
