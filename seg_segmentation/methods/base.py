"""What a training-free segmentation method is (design.md §13).

A training-free method names every pixel with a frozen CLIP - and, for some, a second vision model - changed at
inference only. Most of what such a method does is the same for all of them, and lives once in
``seg_segmentation/dense.py`` (``TrainingFreeSegmentor``): the sliding windows, the text queries (80 prompts,
synonyms), resizing to the original image, PAMR, the probability and area thresholds. A method module in this
package says only what is particular to it:

    class NACLIP(TrainingFreeMethod):
        name, year, summary = 'naclip', 2025, 'neighbour-aware attention in the last block, no residual, no MLP'
        knobs = (Knob('gaussian_std', float, 5.0, 'σ of the neighbourhood Gaussian, in patches'), ...)
        defaults = dict(resolution=336, crop=224, stride=112, logit_scale=40.0)   # every dataset
        presets = {'voc': dict(crop=0, prob_thd=0.1), ...}                       # per --dataset, on top
        published = {'voc': 58.9, ...}                                           # mIoU of its paper

        def dense_features(self, crops, states):      # [B, 3, h, w] -> [B, gh, gw, D] patch features
            ...

A method is an ``nn.Module`` that holds its frozen model(s) (``self.clip``, and ``self.vfm_model`` where it needs a
second vision model: the class attribute ``vfm`` names that model's default, and would hide a submodule of the same
name), so moving it to a device or casting it to bf16 (``modules.precision.set_precision``) moves and casts
everything it computes with. Its knobs are plain attributes, set (and checked) by ``configure``.
"""
import dataclasses
from typing import Any, ClassVar, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# The protocol settings every training-free method has, with the values a method inherits unless its ``defaults``
# or ``presets`` say otherwise: keep-ratio resize to short side ``resolution`` (long side <= 2048), windows of
# ``crop`` px (0 = the whole image in one pass) every ``stride`` px, the prompt set, logit scale, probability /
# area thresholds (area None = off) and PAMR (0 steps = off).
PROTOCOL_DEFAULTS: Dict[str, Any] = dict(resolution=336, crop=224, stride=112, templates='full', logit_scale=40.0,
                                         prob_thd=0.0, area_thd=None, pamr_steps=0, pamr_dilations=(8, 16))
PROTOCOL_KEYS = tuple(PROTOCOL_DEFAULTS)
# the preset a dataset of your own gets (--dataset custom): no background class
CUSTOM_PRESET = 'voc20'
PAD_TO_PATCH = -1     # pad_multiple: pad windows to a multiple of the CLIP's own patch size


@dataclasses.dataclass(frozen=True)
class Knob:
    """A setting particular to one or a few methods; the scripts make it the flag ``--<name>`` (design.md §13)."""
    name: str
    type: type                       # float, int, str or bool
    default: Any
    help: str
    choices: Optional[Tuple] = None

    def check(self, value, method: str):
        """value -> value of the right type; ValueError naming the knob when it is not allowed. None is allowed
        where the default is None (the method then decides, e.g. from the model's depth)."""
        if value is None and self.default is None:
            return None
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f'{method}: {self.name} must be true or false, got {value!r}')
            return value
        try:
            value = self.type(value)
        except (TypeError, ValueError):
            raise ValueError(f'{method}: {self.name} must be {self.type.__name__}, got {value!r}') from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(f'{method}: {self.name} must be one of {", ".join(map(str, self.choices))}, got {value!r}')
        if isinstance(value, float) and value != value:
            raise ValueError(f'{method}: {self.name} must be a number, got nan')
        return value


class Queries(NamedTuple):
    """The text side of one vocabulary: one row per name (synonyms are separate names)."""
    features: torch.Tensor       # [Q, D] float32, L2-normalised
    index: torch.Tensor          # [Q] int64: the class of each name
    words: List[str]             # the Q names


class TrainingFreeMethod(nn.Module):
    """Base class of the training-free methods (one module each in this package).

    A subclass sets the class attributes below and implements ``dense_features`` (or, when its logits are not the
    cosine similarity of patch features with the queries, ``window_logits``). Class attributes:
        name: the ``--method`` value.  year: of publication (orders tables).  summary: one line for ``--help``.
        paper: authors, venue and title, for the docs and the results table.
        knobs: its own settings (``Knob``), flags of the scripts.
        defaults: protocol settings (``PROTOCOL_KEYS``) and knob values for every dataset.
        presets: per ``--dataset`` the settings that differ from ``defaults`` (a method's published configs).
        published: per ``--dataset`` the published mIoU (ViT-B/16), for the README's table.
        pad_multiple: 0 - a window side that is not a multiple of the patch size loses its remainder in the visual
            pass (the patch convolution drops it) and the grid's logits are stretched over the whole window;
            n > 0 - such a window is zero-padded (in normalised space) to the next multiple of n, half before and
            the rest after, and the logits are cut back (windows smaller than the crop only); PAD_TO_PATCH - the
            same with n = the CLIP's patch size (16 for ViT-B/16, 14 for ViT-L/14).
        renormalize: the returned class probabilities are divided by their sum over classes after the threshold.
        vfm: the default second vision model ('--vfm'), or None when the method uses CLIP alone; the method
            receives the loaded model as its constructor's ``vfm`` and holds it as ``self.vfm_model``.
    """
    name: ClassVar[str] = ''
    year: ClassVar[int] = 0
    summary: ClassVar[str] = ''
    paper: ClassVar[str] = ''
    knobs: ClassVar[Tuple[Knob, ...]] = ()
    defaults: ClassVar[Dict[str, Any]] = {}
    presets: ClassVar[Dict[str, Dict[str, Any]]] = {}
    published: ClassVar[Dict[str, float]] = {}
    pad_multiple: ClassVar[int] = 0
    renormalize: ClassVar[bool] = False
    vfm: ClassVar[Optional[str]] = None

    def __init__(self, clip: nn.Module, **knobs):
        super().__init__()
        self.clip = clip
        for knob in self.knobs:
            setattr(self, knob.name, knob.default)
        self.configure(**{**self.knob_defaults(), **knobs})

    # ------------------------------------------------------------------ settings
    @classmethod
    def knob_defaults(cls) -> Dict[str, Any]:
        """Knob values of ``defaults`` (else each knob's own default)."""
        return {k.name: cls.defaults.get(k.name, k.default) for k in cls.knobs}

    @classmethod
    def settings(cls, dataset: str) -> Dict[str, Any]:
        """The method's published protocol and knob values for ``dataset``: ``defaults`` with the dataset's
        ``presets`` entry on top; a benchmark without an entry keeps the defaults, and a dataset of your own
        (``custom``) gets the no-background benchmark's preset, ``CUSTOM_PRESET``."""
        from ..classes import DATASET_CLASSES
        out = dict(PROTOCOL_DEFAULTS)
        out.update({k.name: k.default for k in cls.knobs})
        out.update(cls.defaults)
        if dataset in cls.presets:
            out.update(cls.presets[dataset])
        elif dataset not in DATASET_CLASSES:      # a benchmark without an entry keeps the defaults
            out.update(cls.presets.get(CUSTOM_PRESET, {}))
        return out

    def configure(self, **knobs) -> 'TrainingFreeMethod':
        """Set knobs (None = leave as is); ValueError for a knob this method does not have or a bad value."""
        own = {k.name: k for k in self.knobs}
        for name, value in knobs.items():
            if name not in own:
                raise ValueError(f'{self.name} has no setting {name!r}' +
                                 (f'; its settings: {", ".join(own)}' if own else ''))
            if value is not None:
                setattr(self, name, own[name].check(value, self.name))
        return self

    def knob_values(self) -> Dict[str, Any]:
        return {k.name: getattr(self, k.name) for k in self.knobs}

    # ------------------------------------------------------------------ what a method computes
    @property
    def patch_size(self) -> int:
        return self.clip.patch_size

    @property
    def device(self) -> torch.device:
        return self.clip.visual.conv1.weight.device

    def prepare_image(self, image: torch.Tensor) -> Any:
        """Per-image state that the image's windows share (``window_logits``' ``states``), computed once per image
        [3, H, W] before its windows: e.g. a whole-image embedding, or a random generator seeded per image so
        that results do not depend on batching or on the number of processes. None by default."""
        return None

    def dense_features(self, crops: torch.Tensor, states: Sequence[Any]) -> torch.Tensor:
        """Windows [B, 3, h, w] (normalised; sides multiples of the patch size) -> patch features [B, gh, gw, D]
        (not normalised). ``states``: ``prepare_image``'s result for each window's image."""
        raise NotImplementedError

    def window_logits(self, crops: torch.Tensor, queries: Queries, states: Sequence[Any]) -> torch.Tensor:
        """Windows [B, 3, h, w] -> cosine logits [B, Q, h, w]: every patch feature (L2-normalised) against every
        query, the patch grid resized bilinearly (align_corners False) to the window."""
        h, w = crops.shape[-2:]
        multiple = self.patch_size if self.pad_multiple == PAD_TO_PATCH else self.pad_multiple
        padded, box = pad_or_cut(crops, self.patch_size, multiple)
        feats = F.normalize(self.dense_features(padded, states).float(), dim=-1)      # [B, gh, gw, D]
        logits = (feats @ queries.features.T).permute(0, 3, 1, 2)                      # [B, Q, gh, gw]
        logits = F.interpolate(logits, size=padded.shape[-2:] if box else (h, w), mode='bilinear',
                               align_corners=False)
        if box:
            top, left = box
            logits = logits[..., top:top + h, left:left + w]
        return logits

    def forward(self, crops: torch.Tensor, queries: Queries, states: Optional[Sequence[Any]] = None) -> torch.Tensor:
        return self.window_logits(crops, queries, [None] * len(crops) if states is None else states)


def pad_or_cut(crops: torch.Tensor, patch: int, pad_multiple: int = 0):
    """Windows [B, 3, h, w] -> (windows the visual pass can take, None or the (top, left) offset of the original
    inside the padded one). pad_multiple 0: remainders cut off (the patch convolution ignores them);
    n: zero-padded to multiples of n, half (rounded down) before, the rest after."""
    h, w = crops.shape[-2:]
    if h < patch or w < patch:
        raise ValueError(f'a {h}x{w} window is smaller than one {patch}x{patch} patch')
    if not pad_multiple:
        return crops[..., :h - h % patch, :w - w % patch], None
    ph, pw = -h % pad_multiple, -w % pad_multiple
    if not ph and not pw:
        return crops, None
    return F.pad(crops, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)), (ph // 2, pw // 2)
