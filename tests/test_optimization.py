"""design.md §5: LR schedule, AdamW trajectory, parameter groups, no-decay rule and freezing vs the 2022 behaviour."""
import math

import pytest
import torch

from engine.optimization import (OptimConfig, apply_freezing, build_optimizer, build_param_groups,
                                  frozen_parameter_names, lr_group_of, resolve_lrs, uses_weight_decay, warmup_cosine,
                                  warmup_cosine_lambda)


def test_warmup_cosine_matches_fixture(reference):
    opt = reference["optimizer"]
    got = [warmup_cosine(x, 0.15) for x in opt["warmup_cosine_x"]]
    assert got == pytest.approx(opt["warmup_cosine"], abs=1e-12)


def test_warmup_cosine_lr_start_end():
    assert warmup_cosine(0.0, 0.1, lr_start=0.2) == pytest.approx(0.2)
    assert warmup_cosine(0.05, 0.1, lr_start=0.2) == pytest.approx(0.6)
    assert warmup_cosine(1.0, 0.1, lr_end=0.1) == pytest.approx(0.1)
    assert warmup_cosine(0.55, 0.1, lr_end=0.0) == pytest.approx(0.5)


def test_adamw_lambdalr_reproduces_2022_trajectory(reference):
    opt = reference["optimizer"]
    a = opt["adamw_args"]
    p = torch.nn.Parameter(opt["adamw_init"].clone())
    optim = torch.optim.AdamW([p], lr=a["lr"], betas=(a["b1"], a["b2"]), eps=a["eps"], weight_decay=a["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(optim, warmup_cosine_lambda(a["t_total"], a["warmup"]))
    traj = []
    for _ in range(a["t_total"]):
        optim.zero_grad()
        (((p - 0.3) ** 2) * torch.arange(1, 8)).sum().backward()
        optim.step()
        sched.step()
        traj.append(p.detach().clone())
    torch.testing.assert_close(torch.stack(traj), opt["adamw_trajectory"], atol=1e-6, rtol=1e-5)


def test_build_optimizer_trajectory_through_our_builder(reference):
    """The same trajectory through build_optimizer on a one-parameter module named like a new-part parameter."""
    opt = reference["optimizer"]
    a = opt["adamw_args"]

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(opt["adamw_init"].clone())
    m = One()
    cfg = OptimConfig(lr=a["lr"], weight_decay=a["weight_decay"], betas=(a["b1"], a["b2"]), eps=a["eps"],
                      warmup_proportion=a["warmup"])
    optim, sched = build_optimizer(m, cfg, a["t_total"])
    for k in range(a["t_total"]):
        optim.zero_grad()
        (((m.w - 0.3) ** 2) * torch.arange(1, 8)).sum().backward()
        optim.step()
        sched.step()
    torch.testing.assert_close(m.w.detach(), opt["adamw_trajectory"][-1], atol=1e-6, rtol=1e-5)


EXPECTED_FROZEN_DEFAULT = {
    "clip.token_embedding.weight", "clip.positional_embedding", "clip.visual.class_embedding",
    "clip.visual.positional_embedding", "clip.visual.conv1.weight", "clip.visual.ln_pre.weight",
    "clip.visual.ln_pre.bias",
}


def test_default_freezing_is_the_2022_set(tiny_model):
    assert set(frozen_parameter_names(tiny_model, 0, 0)) == EXPECTED_FROZEN_DEFAULT


def test_freeze_layer_num_counts_layers0_then_layers2(tiny_model):
    # tiny model: 10 blocks in layers0, 2 in layers2, 2 text blocks
    frozen = set(frozen_parameter_names(tiny_model, 11, 0))
    assert "clip.visual.transformer.layers0.9.attn.in_proj_weight" in frozen
    assert "clip.visual.transformer.layers2.0.mlp.c_fc.weight" in frozen       # index 10 < 11
    assert "clip.visual.transformer.layers2.1.mlp.c_fc.weight" not in frozen   # index 11
    assert "clip.transformer.resblocks.1.ln_1.weight" in frozen
    for always in ("clip.ln_final.weight", "clip.text_projection", "clip.logit_scale", "clip.visual.ln_post.weight",
                   "clip.visual.proj", "clip.visual.transformer.semantic_layer2.semantic_center",
                   "clip.visual.transformer.layers_mae2.0.attn.in_proj_weight",
                   "clip.visual.transformer.reconstruct_layer2.rec_proj_a.a_fc.weight"):
        assert always not in frozen, always
    assert not any(n.startswith("vis_mae_decoder.") for n in frozen)


def test_freeze_minus_one_and_text_layers(tiny_model):
    # -1 disables the loop; the 2022 script still froze the patch embedding and visual positions
    assert set(frozen_parameter_names(tiny_model, -1, 0)) == {"clip.visual.positional_embedding",
                                                             "clip.visual.conv1.weight"}
    frozen = set(frozen_parameter_names(tiny_model, -1, 1))
    assert {"clip.token_embedding.weight", "clip.positional_embedding",
            "clip.transformer.resblocks.0.attn.in_proj_weight"} <= frozen
    assert "clip.transformer.resblocks.1.attn.in_proj_weight" not in frozen
    with pytest.raises(ValueError, match="freeze_layer_num"):
        frozen_parameter_names(tiny_model, 13, 0)


def test_param_groups_lr_and_decay(tiny_model):
    names = apply_freezing(tiny_model, 0, 0)
    assert not any(p.requires_grad for n, p in tiny_model.named_parameters() if n in names)
    groups = build_param_groups(tiny_model, lr=4e-3, lower_lr=4e-6, weight_decay=0.05)
    by_name = {n: g for g in groups for n in g["param_names"]}
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert set(by_name) == trainable                      # every trainable tensor in exactly one group
    assert sum(len(g["params"]) for g in groups) == len(trainable)

    def lr(n):
        return by_name[n]["lr"]

    def wd(n):
        return by_name[n]["weight_decay"]
    for n in ("clip.logit_scale", "clip.ln_final.weight", "clip.text_projection",
              "clip.visual.transformer.layers0.3.mlp.c_fc.weight", "clip.transformer.resblocks.0.attn.in_proj_weight"):
        assert lr(n) == 4e-6, n
    for n in ("clip.visual.transformer.layers2.0.mlp.c_fc.weight", "clip.visual.proj", "clip.visual.ln_post.weight",
              "clip.visual.transformer.semantic_layer2.semantic_center", "vis_mae_decoder.decoder_pred.weight",
              "clip.visual.transformer.layers_mae2.1.attn.out_proj.weight"):
        assert lr(n) == 4e-3, n
    # no decay only for names containing 'bias'; LayerNorm weights (ln_*) and logit_scale ARE decayed (2022)
    assert wd("clip.visual.transformer.layers0.0.attn.in_proj_bias") == 0.0
    assert wd("clip.ln_final.bias") == 0.0
    assert wd("clip.ln_final.weight") == 0.05
    assert wd("clip.logit_scale") == 0.05
    assert wd("clip.visual.transformer.semantic_layer2.semantic_center") == 0.05


def test_lower_text_lr_group_and_defaults(tiny_model):
    apply_freezing(tiny_model, -1, 0, freeze_patch_embed=False)     # text embeddings trainable
    groups = build_param_groups(tiny_model, lr=1e-3, lower_lr=1e-5, lower_text_lr=1e-6)
    by_name = {n: g["lr"] for g in groups for n in g["param_names"]}
    assert by_name["clip.token_embedding.weight"] == 1e-6
    assert by_name["clip.positional_embedding"] == 1e-6
    assert by_name["clip.visual.conv1.weight"] == 1e-5
    assert lr_group_of("clip.visual.class_embedding") == "lower_lr"
    assert resolve_lrs(1e-3) == {"lr": 1e-3, "lower_lr": 1e-3, "lower_text_lr": 1e-3}
    assert resolve_lrs(1e-3, coef_lr=0.1)["lower_text_lr"] == pytest.approx(1e-4)
    assert uses_weight_decay("x.weight") and not uses_weight_decay("x.LayerNorm.weight")


def test_scheduler_drives_each_group_lr(tiny_model):
    apply_freezing(tiny_model)
    cfg = OptimConfig(lr=4e-3, lower_lr=4e-6, warmup_proportion=0.15)
    optim, sched = build_optimizer(tiny_model, cfg, total_steps=20)
    base = {g["name"]: g["lr"] for g in optim.param_groups}
    assert base["lr/decay"] == pytest.approx(4e-3 * warmup_cosine(1 / 20, 0.15))
    assert base["lower_lr/decay"] == pytest.approx(4e-6 * warmup_cosine(1 / 20, 0.15))
    for k in range(9):
        optim.step()
        sched.step()
    assert optim.param_groups[0]["lr"] / optim.param_groups[0]["initial_lr"] == pytest.approx(
        warmup_cosine(10 / 20, 0.15))
    assert math.isclose(sum(1 for _ in optim.param_groups), len({g["name"] for g in optim.param_groups}))
