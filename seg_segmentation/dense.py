"""Training-free segmentation: what every method of seg_segmentation/methods/ shares (design.md §12, §13).

    method = build_method('sclip', clip)                   # seg_segmentation/methods/
    seg = TrainingFreeSegmentor(method, name_file='seg_segmentation/names/voc21.txt', **method.settings('voc'))
    seg.queries.features                                   # [Q, D]  one row per name (synonyms included)
    seg_logits, seg_pred = seg.predict(image, ori_shape=(H, W))   # image [1,3,h,w] -> [C,H,W], [1,H,W]

The method turns windows into cosine logits (its own visual change); everything else is here, the same for every
method: the text queries (every name of every class through the prompts, each prompt's embedding normalised, the
mean normalised), windows of ``crop`` px every ``stride`` px (0 = the whole image) averaged where they overlap and
batched across images, the resize to the original size, PAMR, ``logit_scale``, the softmax over names with each
class keeping its best name, ``area_thd`` (foreground classes covering too little of the foreground are dropped)
and ``prob_thd`` (unsure pixels go to class 0).
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from common.cli import SEGCLIP_WINDOW
from common.errors import UsageError
from .inference import IntPair, _pair, build_text_embedding, refine_with_pamr, slide_windows
from .methods import PROTOCOL_KEYS, Queries, TrainingFreeMethod
from .synonyms import flatten, parse_name_lines, read_name_file


def method_defaults(method: str, dataset: str) -> dict:
    """``method``'s published protocol on ``dataset`` (every PROTOCOL_KEYS setting, and the method's knobs); SegCLIP:
    its window and prompts (design.md §7.3)."""
    if method == 'segclip':
        return dict(SEGCLIP_WINDOW)
    from .methods import get_method
    try:
        return get_method(method).settings(dataset)
    except ValueError as e:
        raise UsageError(str(e)) from None


def resolve_settings(method: str, dataset: str, args) -> dict:
    """``method``'s preset for ``dataset`` with the flags given in ``args`` on top (``common.cli.PROTOCOL_FLAGS`` and
    the method's knobs; None = not given). SegCLIP: its window and prompts, and PAMR as given (default off)."""
    from common.cli import PROTOCOL_FLAGS, check_stride
    out = method_defaults(method, dataset)
    if method == 'segclip':
        out.update(pamr_steps=0, pamr_dilations=(8, 16))
    for flag, key in PROTOCOL_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None and (key in out or method != 'segclip'):
            out[key] = tuple(value) if isinstance(value, list) else value
    for key in list(out):
        value = getattr(args, key, None) if key not in PROTOCOL_KEYS else None
        if value is not None:
            out[key] = value
    check_stride(out['crop'], out['stride'])
    return out


class TrainingFreeSegmentor:
    """Names every pixel with a training-free method (``seg_segmentation.methods``).

    Args:
        method: a ``TrainingFreeMethod`` (it holds the CLIP; eval mode, on its device).
        name_lines / name_file / classes: the class lines (names separated by ", "), a file of them, or the parsed
            per-class name lists (``synonyms.parse_name_lines``); give exactly one.
        templates: prompt set for every name ('full' = the 80 ImageNet prompts).
        logit_scale: multiplies the cosine similarities before the softmax over names.
        prob_thd: pixels whose best class probability is below it become class 0.
        area_thd: None, or foreground classes (>= 1) predicted on at most area_thd x the foreground area are zeroed.
        pamr_steps / pamr_dilations: PAMR on the logits at the original size (0 steps = off).
        crop / stride: sliding window (crop 0: the whole image at once); batch_size: windows per visual forward
            (windows of several images pooled).
        resolution: not used here (the image comes resized); accepted so that ``method.settings(dataset)`` can
            be passed as is.
    """

    def __init__(self, method: TrainingFreeMethod, name_lines: Optional[Sequence[str]] = None, name_file=None,
                 classes: Optional[Sequence[Sequence[str]]] = None, templates='full', logit_scale: float = 40.0,
                 prob_thd: float = 0.0, area_thd: Optional[float] = None, pamr_steps: int = 0,
                 pamr_dilations: Sequence[int] = (8, 16), crop: IntPair = 224, stride: IntPair = 112,
                 batch_size: int = 16, resolution: Optional[int] = None, **knobs):
        if not isinstance(method, TrainingFreeMethod):
            raise TypeError(f'method must be a TrainingFreeMethod, got {type(method).__name__}')
        if sum(x is not None for x in (name_lines, name_file, classes)) != 1:
            raise ValueError('give exactly one of name_lines, name_file, classes')
        if area_thd is not None and not 0 <= area_thd < 1:
            raise ValueError(f'area_thd must be in [0, 1) or None, got {area_thd}')
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        self.method = method.configure(**knobs)
        if classes is None:
            classes = read_name_file(name_file) if name_file is not None else parse_name_lines(name_lines)
        self.classes = [list(c) for c in classes]
        words, idx = flatten(self.classes)
        self.device = method.device
        features = build_text_embedding(method.clip, words, templates, normalize_each=True).to(self.device)
        self.queries = Queries(features, torch.tensor(idx, dtype=torch.long, device=self.device), words)   # [Q, D]
        self.logit_scale, self.prob_thd, self.area_thd = float(logit_scale), float(prob_thd), area_thd
        self.pamr_steps, self.pamr_dilations = int(pamr_steps), tuple(int(d) for d in pamr_dilations)
        self.crop, self.stride, self.batch_size = crop, stride, int(batch_size)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> List[str]:
        """The first name of each class (its label in tables)."""
        return [c[0] for c in self.classes]

    def settings(self) -> Dict:
        """What this segmentor computes with (protocol settings and the method's knobs), for reports."""
        return dict(logit_scale=self.logit_scale, prob_thd=self.prob_thd, area_thd=self.area_thd,
                    **self.method.knob_values())

    # ------------------------------------------------------------------ windows
    @torch.no_grad()
    def slide_logits(self, images: Union[torch.Tensor, Sequence[torch.Tensor]], crop: Optional[IntPair] = None,
                     stride: Optional[IntPair] = None, batch_size: Optional[int] = None) -> List[torch.Tensor]:
        """images [B,3,H,W] or a list of [3,H_i,W_i] -> list of window-averaged logits [Q, H_i, W_i]; crop /
        stride / batch_size default to the segmentor's. Windows of equal size are batched across images, each
        image's in row-major order. As SegCLIP's (``ZeroShotSegmentor.slide_logits``), a side shorter than one
        patch (a small --resolution, a photo thinner than 1/14 of its length) is padded with zeros - the mean
        colour - to one patch, and the padding cut off again."""
        patch = self.method.patch_size
        images = [img.to(self.device) for img in images]
        crop = self.crop if crop is None else crop
        stride = self.stride if stride is None else stride
        if 0 < min(_pair(crop)) < patch:
            raise UsageError(f'crop size {crop} is smaller than one {patch}x{patch} patch of this CLIP; give a '
                             f'--crop_size of at least {patch} (or 0: the whole image)')
        batch_size = self.batch_size if batch_size is None else int(batch_size)
        Q = self.queries.features.shape[0]
        sums, counts, states, jobs, sizes = [], [], [], {}, []
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f'expected an image [3, H, W], got {tuple(img.shape)}')
            sizes.append(tuple(img.shape[-2:]))
            if img.shape[-2] < patch or img.shape[-1] < patch:
                images[i] = img = F.pad(img, (0, max(patch - img.shape[-1], 0), 0, max(patch - img.shape[-2], 0)))
            H, W = img.shape[-2:]
            sums.append(torch.zeros(Q, H, W, device=self.device))
            counts.append(torch.zeros(1, H, W, device=self.device))
            states.append(self.method.prepare_image(img))
            for y1, y2, x1, x2 in slide_windows(H, W, crop, stride):
                jobs.setdefault((y2 - y1, x2 - x1), []).append((i, y1, y2, x1, x2))
        for windows in jobs.values():
            for start in range(0, len(windows), batch_size):
                part = windows[start:start + batch_size]
                crops = torch.stack([images[i][:, y1:y2, x1:x2] for i, y1, y2, x1, x2 in part])
                logits = self.method.window_logits(crops, self.queries, [states[job[0]] for job in part])
                for (i, y1, y2, x1, x2), lg in zip(part, logits):
                    sums[i][:, y1:y2, x1:x2] += lg
                    counts[i][:, y1:y2, x1:x2] += 1
        return [(s / c)[:, :h, :w] for s, c, (h, w) in zip(sums, counts, sizes)]

    # ------------------------------------------------------------------ whole image
    @torch.no_grad()
    def resize_and_refine(self, logits: torch.Tensor, image: torch.Tensor, ori_shape: Sequence[int]) -> torch.Tensor:
        """Window-averaged logits [Q, h, w] of ``image`` [3, h, w] -> [Q, H, W] at ``ori_shape``: bilinear resize,
        then PAMR (when on) guided by the image resized bilinearly to that size."""
        size = tuple(int(v) for v in ori_shape[:2])
        if self.pamr_steps > 0:
            return refine_with_pamr(logits, image, size, self.pamr_steps, self.pamr_dilations)
        return F.interpolate(logits[None], size=size, mode='bilinear', align_corners=False)[0]

    @torch.no_grad()
    def postprocess(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Query logits [Q, H, W] -> class probabilities [C, H, W] and labels [1, H, W] (int64)."""
        probs = (logits * self.logit_scale).softmax(dim=0)                   # over names
        C = self.num_classes
        if C != probs.shape[0]:   # each class: the best of its names
            idx = self.queries.index.to(probs.device)
            probs = torch.stack([probs[idx == c].amax(dim=0) for c in range(C)])
        if self.area_thd is not None:
            area = F.one_hot(probs.argmax(dim=0), C).to(probs.dtype).sum(dim=(0, 1))[1:]   # [C-1] foreground pixels
            keep = (area > self.area_thd * area.sum()).to(probs.dtype)
            probs[1:] *= keep[:, None, None]
        best, pred = probs.max(dim=0, keepdim=True)
        pred[best < self.prob_thd] = 0
        if self.method.renormalize:
            probs = probs / probs.sum(dim=0, keepdim=True)
        return probs, pred

    @torch.no_grad()
    def query_logits(self, image: torch.Tensor, ori_shape: Sequence[int]) -> torch.Tensor:
        """image [1, 3, h, w] (normalised, already at the evaluation resolution) -> [1, Q, H, W] at ``ori_shape``."""
        if image.dim() != 4 or image.shape[0] != 1:
            raise ValueError(f'expected one image [1, 3, h, w], got {tuple(image.shape)}')
        return self.resize_and_refine(self.slide_logits(image)[0], image[0].to(self.device), ori_shape)[None]

    @torch.no_grad()
    def predict(self, image: torch.Tensor, ori_shape: Optional[Sequence[int]] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """image [1, 3, h, w] -> (seg_logits [C, H, W], seg_pred [1, H, W]); ori_shape (H, W) defaults to (h, w)."""
        ori_shape = tuple(image.shape[-2:]) if ori_shape is None else ori_shape
        return self.postprocess(self.query_logits(image, ori_shape)[0])

    @torch.no_grad()
    def predict_labels(self, images: Union[torch.Tensor, Sequence[torch.Tensor]],
                       out_sizes: Optional[Sequence] = None, crop: Optional[IntPair] = None,
                       stride: Optional[IntPair] = None, batch_size: Optional[int] = None,
                       max_elements: Optional[int] = None) -> List[torch.Tensor]:
        """Several images [3, h_i, w_i] (their windows pooled into batches) -> label maps [H_i, W_i] int64.

        The signature of ``ZeroShotSegmentor.predict_labels``, so the evaluation and the demo run either; crop /
        stride / batch_size replace the segmentor's own for this call. ``max_elements`` is accepted and unused:
        the thresholds need every class's probabilities at the output size."""
        images = [img.to(self.device) for img in images]   # once: the windows and PAMR's guide are cut from them
        logits = self.slide_logits(images, crop, stride, batch_size)
        preds = []
        for i, lg in enumerate(logits):
            size = tuple(lg.shape[-2:]) if out_sizes is None else out_sizes[i]
            preds.append(self.postprocess(self.resize_and_refine(lg, images[i], size))[1][0])
        return preds

