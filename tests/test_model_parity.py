"""The model against the outputs recorded from the 2022 code (design.md §11): eval passes, text, losses, gradients."""
import pytest
import torch

from modules.modeling import SegCLIP

ATOL, RTOL = 1e-5, 1e-4          # model outputs
LOSS_TOL = 1e-4                  # losses and gradients


def close(a, b, atol=ATOL, rtol=RTOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("res", ["res1x", "res2x"])
def test_eval_outputs(reference, tiny_model, res):
    images = reference["images"] if res == "res1x" else reference["images_2x"]
    expected = reference["eval"][res]
    with torch.no_grad():
        out = tiny_model.encode_image(images)
    close(out.image_embed, expected["image_embed"])
    close(torch.cat([out.image_embed[:, None], out.group_embeds], dim=1), expected["tokens"])
    close(out.soft_attn, expected["soft_attn"])
    assert torch.equal(out.hard_attn, expected["hard_attn"])
    # each patch is assigned to exactly one center
    assert torch.equal(out.hard_attn.sum(1), torch.ones_like(out.hard_attn.sum(1)))


def test_text_embeddings(reference, tiny_model):
    with torch.no_grad():
        close(tiny_model.encode_text(reference["train_text"]["input_ids"]), reference["eval"]["text_embed"])
        close(tiny_model.encode_text(reference["tokenizer"]["eval_tokens"]), reference["eval"]["text_embed_eval_tokens"])


def _train_losses(reference, model):
    t, inputs = reference["train"], reference["train_inputs"]
    return model.compute_losses(
        reference["train_text"]["input_ids"], inputs["image"][:, 0],
        superpixels=inputs["image_seg"][:, 0], gumbel_noise=(t["gumbel_samples"][0], t["gumbel_samples"][1]),
        mae_noise=t["mae_noise"])


def test_training_losses_and_gradients(reference):
    model = SegCLIP.from_state_dict(reference["segclip_state_dict"]).train()
    losses = _train_losses(reference, model)
    expected = reference["train"]["losses"]
    for name in ("contrastive", "kl", "mae"):
        close(losses[name], expected[name], atol=LOSS_TOL, rtol=LOSS_TOL)
    close(losses["total"], expected["full"], atol=LOSS_TOL, rtol=LOSS_TOL)
    close(losses["contrastive"] + losses["kl"], expected["contrastive_kl"], atol=LOSS_TOL, rtol=LOSS_TOL)
    losses["total"].backward()
    params = dict(model.named_parameters())
    assert expected["grads"], "fixture lists gradients"
    for name, grad in expected["grads"].items():
        assert params[name].grad is not None, name
        close(params[name].grad, grad, atol=LOSS_TOL, rtol=LOSS_TOL)


def test_losses_switch_off(reference):
    sd = reference["segclip_state_dict"]
    model = SegCLIP.from_state_dict(sd, use_vision_mae_recon=False, use_seglabel=False).train()
    losses = _train_losses(reference, model)
    assert set(losses) == {"contrastive", "total"}
    close(losses["contrastive"], reference["train"]["losses"]["contrastive"], atol=LOSS_TOL, rtol=LOSS_TOL)


def test_random_draws_are_sampled_when_not_given(reference):
    model = SegCLIP.from_state_dict(reference["segclip_state_dict"]).train()
    inputs = reference["train_inputs"]
    torch.manual_seed(0)
    a = model.compute_losses(reference["train_text"]["input_ids"], inputs["image"][:, 0], inputs["image_seg"][:, 0])
    torch.manual_seed(0)
    b = model.compute_losses(reference["train_text"]["input_ids"], inputs["image"][:, 0], inputs["image_seg"][:, 0])
    torch.manual_seed(1)
    c = model.compute_losses(reference["train_text"]["input_ids"], inputs["image"][:, 0], inputs["image_seg"][:, 0])
    assert torch.isfinite(a["total"])
    assert a["mae"].item() == b["mae"].item()
    assert a["mae"].item() != c["mae"].item()


def test_mae_decoder_pos_embed_is_fixed_sincos(reference):
    from modules.mae import sincos_pos_embed_2d
    expected = reference["segclip_state_dict"]["vis_mae_decoder.decoder_pos_embed"]
    fresh = SegCLIP(SegCLIP.config_from_state_dict(reference["segclip_state_dict"]))
    assert torch.equal(fresh.vis_mae_decoder.decoder_pos_embed.data, expected)
    assert not fresh.vis_mae_decoder.decoder_pos_embed.requires_grad
    assert torch.equal(sincos_pos_embed_2d(expected.shape[-1], 7).unsqueeze(0), expected)


def test_batching_does_not_change_outputs(reference, tiny_model):
    """Per-sample cross-attention (design.md §10.1): a sample's output does not depend on its batch mates."""
    images = reference["images"]
    with torch.no_grad():
        both = tiny_model.encode_image(images)
        single = [tiny_model.encode_image(images[i:i + 1]) for i in range(len(images))]
    for i, s in enumerate(single):
        close(both.group_embeds[i:i + 1], s.group_embeds)
        close(both.soft_attn[i:i + 1], s.soft_attn)


def test_any_eval_resolution_multiple_of_patch(tiny_model):
    with torch.no_grad():
        out = tiny_model.encode_image(torch.randn(1, 3, 96, 160))
    assert out.soft_attn.shape == (1, 8, 6 * 10)
    assert out.group_embeds.shape == (1, 8, 32)


def test_autocast_bf16_close_to_fp32(reference, tiny_model):
    images = reference["images"]
    with torch.no_grad():
        ref = tiny_model.encode_image(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tiny_model.encode_image(images)
            text = tiny_model.encode_text(reference["train_text"]["input_ids"])
    cos = torch.nn.functional.cosine_similarity(out.image_embed.float(), ref.image_embed, dim=-1)
    assert cos.min() > 0.99, cos
    assert (out.soft_attn.float() - ref.soft_attn).abs().max() < 0.1
    ref_text = tiny_model.encode_text(reference["train_text"]["input_ids"])
    assert torch.nn.functional.cosine_similarity(text.float(), ref_text, dim=-1).min() > 0.99


def test_autocast_bf16_training_step_runs(reference):
    model = SegCLIP.from_state_dict(reference["segclip_state_dict"]).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _train_losses(reference, model)
    assert torch.isfinite(losses["total"])
    assert abs(losses["total"].item() - reference["train"]["losses"]["full"].item()) < 0.1
    losses["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
