"""The training-free segmentation methods, one module each (design.md §13).

    from seg_segmentation.methods import METHODS, build_method
    METHODS['naclip'].settings('voc')        # its published protocol and knobs for VOC21
    method = build_method('naclip', clip)    # an nn.Module holding the frozen CLIP

A method is a module of this package that defines ``METHOD``, a ``TrainingFreeMethod`` subclass; it is found
here, so adding a method is adding its file. ``METHODS`` lists them by year, then name.
"""
import importlib
import pkgutil
from typing import Dict, Optional, Type

from .base import PROTOCOL_DEFAULTS, PROTOCOL_KEYS, Knob, Queries, TrainingFreeMethod


def _discover() -> Dict[str, Type[TrainingFreeMethod]]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f'{__name__}.{info.name}')
        cls = getattr(module, 'METHOD', None)
        if cls is not None:
            found.append(cls)
    return {cls.name: cls for cls in sorted(found, key=lambda c: (c.year, c.name))}


METHODS: Dict[str, Type[TrainingFreeMethod]] = _discover()


def get_method(name: str) -> Type[TrainingFreeMethod]:
    if name not in METHODS:
        raise ValueError(f'unknown training-free method {name!r}; choose one of {", ".join(METHODS)}')
    return METHODS[name]


def build_method(name: str, clip, vfm=None, **knobs) -> TrainingFreeMethod:
    """The method ``name`` around a loaded CLIP (``modules.clip.CLIP``), with its second vision model where it
    needs one, in eval mode on the CLIP's device."""
    cls = get_method(name)
    kwargs = dict(knobs)
    if cls.vfm is not None:
        if vfm is None:
            raise ValueError(f'{name} needs a second vision model (vfm)')
        kwargs['vfm'] = vfm
    return cls(clip, **kwargs).eval()


def load_method(name: str, clip_weights: str = 'ViT-B/16', *, vfm: Optional[str] = None,
                cache_dir: Optional[str] = None, device='cpu', precision: str = 'fp32', activation: Optional[str] = None,
                loaded: Optional[dict] = None) -> TrainingFreeMethod:
    """The method ``name`` with its weights read from files (``modules.checkpoint``; names are downloaded into
    the cache when missing), at ``precision`` (modules/precision.py) on ``device``. ``loaded``: a dict that keeps
    the models read, so that several methods share one CLIP (and one second vision model) instead of reading it
    again."""
    from modules.precision import set_precision
    cls = get_method(name)
    loaded = {} if loaded is None else loaded
    if 'clip' not in loaded:
        from common.download import QUICKSTART_CHECKPOINT, QUICKSTART_MAKES_IT, DownloadError
        from modules.checkpoint import load_clip
        try:
            clip = load_clip(clip_weights, cache_dir=cache_dir, device=device, activation=activation)
        except DownloadError as e:   # a named CLIP that cannot be fetched: say what works without it
            raise DownloadError(f"{e}; or run the method on the CLIP inside a SegCLIP checkpoint, e.g. "
                                f"--pretrained_clip_name {QUICKSTART_CHECKPOINT} ({QUICKSTART_MAKES_IT})") from None
        loaded['clip'] = set_precision(clip, precision).eval()
    second = None
    if cls.vfm is not None:
        key = ('vfm', vfm or cls.vfm)
        if key not in loaded:
            from modules.checkpoint import load_vfm
            loaded[key] = set_precision(load_vfm(key[1], cache_dir=cache_dir, device=device), precision).eval()
        second = loaded[key]
    return build_method(name, loaded['clip'], vfm=second)


__all__ = ['METHODS', 'PROTOCOL_DEFAULTS', 'PROTOCOL_KEYS', 'Knob', 'Queries', 'TrainingFreeMethod', 'build_method',
           'get_method', 'load_method']
