"""Lets ``mmseg.datasets`` / ``mmseg.evaluation`` import on ``mmcv-lite`` (mmcv without compiled ops).

mmseg 1.x imports ``mmcv.ops`` at import time (through ``mmseg.utils``), and every ``mmcv.ops`` module asks
``mmcv.utils.ext_loader.load_ext('_ext', [...])`` for its compiled kernels, which mmcv-lite does not ship. The
evaluation only needs mmseg's dataset classes, loading/resize transforms and IoU arithmetic, none of which call a
compiled op. ``install()`` registers a stand-in ``mmcv._ext`` module whose every attribute is a function that raises
a clear error if it is ever *called*. It is a no-op when the real compiled extension is importable, so a full mmcv 2.1
keeps using its genuine ops.
"""
import importlib.util
import sys
import types

_STANDIN_NAME = "mmcv._ext"


class _MissingOpsModule(types.ModuleType):
    """Stand-in for ``mmcv._ext``: any op lookup succeeds, any op call raises."""

    is_segclip_standin = True

    def __getattr__(self, name: str):
        if name.startswith("__"):  # keep the import machinery / pickling honest
            raise AttributeError(name)

        def _missing_op(*args, **kwargs):
            raise RuntimeError(
                f"mmcv op '{name}' needs mmcv's compiled extension, but only mmcv-lite is installed. "
                "SegCLIP's evaluation does not use compiled ops; if you need them, install the full 'mmcv' "
                "package built for your torch/CUDA version.")

        _missing_op.__name__ = name
        return _missing_op


def has_real_ops() -> bool:
    """True when mmcv's genuine compiled extension is importable."""
    existing = sys.modules.get(_STANDIN_NAME)
    if existing is not None:
        return not getattr(existing, "is_segclip_standin", False)
    try:
        return importlib.util.find_spec(_STANDIN_NAME) is not None
    except (ImportError, ValueError):  # mmcv itself missing
        return False


def install() -> bool:
    """Register the stand-in if (and only if) the compiled ops are missing. Returns True when it was installed."""
    if _STANDIN_NAME in sys.modules or has_real_ops():
        return False
    sys.modules[_STANDIN_NAME] = _MissingOpsModule(_STANDIN_NAME)
    return True


install()
