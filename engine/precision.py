"""Numeric precision of a training run (``--amp off|bf16|fp16``, TF32), checked before any step is taken.

Autocast covers the towers only: the center assignment (modules/centers.py) and the loss functions
(modules/losses.py) switch it off and compute in fp32 (design.md §4).
"""
from contextlib import nullcontext
from typing import ContextManager, Optional

import torch

from common.errors import SegCLIPError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(SegCLIPError, ValueError):
    """The requested precision cannot run on this device."""


def cuda_has_native_bf16(device: torch.device) -> bool:
    """bf16 tensor-core matmuls (compute capability 8.0+: Ampere and later)."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def check_precision(amp: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run, at start (not at the first forward)."""
    if amp not in AMP_DTYPES:
        raise PrecisionError(f"--amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise PrecisionError("--amp fp16 needs CUDA; use --amp bf16 on CPU")
    if amp == "bf16" and device.type == "cuda" and not cuda_has_native_bf16(device):
        name = torch.cuda.get_device_name(device)
        raise PrecisionError(f"--amp bf16: {name} (compute capability "
                             f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}) has no bf16 "
                             f"support; use --amp fp16 (with a gradient scaler) or --amp off")


def autocast(amp: str, device: torch.device) -> ContextManager:
    """The autocast context of the forward pass (a no-op for ``--amp off``)."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def allow_tf32(amp: str, device: torch.device, enabled: bool = True) -> Optional[str]:
    """With ``--amp off`` on a GPU with TF32 tensor cores (8.0+), let fp32 matmuls use them (10-bit mantissa
    inputs, fp32 accumulation). Returns a line for the log, None when nothing applies."""
    if device.type != "cuda" or amp != "off":
        return None
    if not cuda_has_native_bf16(device):      # TF32 arrived with bf16, in Ampere
        return None
    torch.set_float32_matmul_precision("high" if enabled else "highest")   # cuDNN convolutions: TF32 by default
    if enabled:
        return "fp32 matmuls use TF32 tensor cores on this GPU (--no_tf32 for full fp32 products)"
    return "TF32 off (--no_tf32): full fp32 matmuls"
