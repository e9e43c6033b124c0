"""Inference precision of a SegCLIP model (``--precision fp32|bf16`` of the evaluation and the demo).

bf16 stores the weights in bfloat16 and runs every matrix product in it (no autocast re-casting weights on every
call); LayerNorm keeps float32 weights and computes in float32 (``modules.layers.LayerNorm``), attention softmax
accumulates in float32 inside ``scaled_dot_product_attention``, the center assignment is computed in float32
(``modules.centers``), and the zero-shot head works on float32 copies of the outputs. fp32 is the default and gives
the published numbers; docs/evaluation.md gives bf16's speed and agreement.
"""
PRECISIONS = ("fp32", "bf16")    # names only: the scripts' --help does not import torch


def precision_dtype(precision: str):
    """'fp32' | 'bf16' -> torch.float32 | torch.bfloat16."""
    import torch
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def set_precision(model, precision: str = "fp32"):
    """Cast ``model`` in place for inference at ``precision``; LayerNorm weights and the logit scale stay float32."""
    import torch
    from torch import nn
    dtype = precision_dtype(precision)
    model.to(dtype)
    if dtype != torch.float32:
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.float()
        clip = getattr(model, "clip", None)
        if clip is not None and hasattr(clip, "logit_scale"):
            clip.logit_scale.data = clip.logit_scale.data.float()
    return model


def model_precision(model) -> str:
    """'fp32' or 'bf16': the dtype of the matrix weights (all share it)."""
    dtype = next(p.dtype for p in model.parameters() if p.dim() >= 2)
    return next((k for k in PRECISIONS if precision_dtype(k) == dtype), str(dtype).replace("torch.", ""))
