"""Training-free segmentation with a plain CLIP's dense features: SCLIP's protocol (design.md §12).

    seg = DenseCLIPSegmentor(clip, name_file='seg_segmentation/names/voc21.txt', method='sclip',
                             logit_scale=65, prob_thd=0.1, area_thd=0.1)
    seg.query_features                                   # [Q, D]  one row per name (synonyms included)
    seg_logits, seg_pred = seg.predict(image, ori_shape=(H, W))   # image [1,3,h,w] -> [C,H,W], [1,H,W]

Every patch token (``CLIP.encode_dense``) is compared with every name's text embedding (cosine); windows of
``crop`` px with ``stride`` are averaged where they overlap, resized to the original image size, optionally refined
by PAMR, scaled by ``logit_scale``, soft-maxed over names, and each class keeps the best of its names. ``area_thd``
drops foreground classes covering too little of the foreground; ``prob_thd`` sends unsure pixels to class 0.
"""
import contextlib
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from modules.clip import DENSE_METHODS

from .inference import IntPair, build_text_embedding, model_device, refine_with_pamr, slide_windows, unwrap_model
from .synonyms import flatten, parse_name_lines, read_name_file


# SCLIP's published evaluation settings per benchmark: the short side of the keep-ratio resize (long side <= 2048)
# and the head's logit_scale / prob_thd / area_thd; windows are 224 px with stride 112 and PAMR is off throughout.
SCLIP_PRESETS = {
    'voc': dict(resolution=336, logit_scale=65.0, prob_thd=0.1, area_thd=0.1),
    'context': dict(resolution=336, logit_scale=50.0, prob_thd=0.1, area_thd=None),
    'coco': dict(resolution=336, logit_scale=50.0, prob_thd=0.1, area_thd=None),
    'voc20': dict(resolution=336, logit_scale=40.0, prob_thd=0.0, area_thd=None),
    'context59': dict(resolution=336, logit_scale=40.0, prob_thd=0.0, area_thd=None),
    'coco_stuff': dict(resolution=448, logit_scale=40.0, prob_thd=0.0, area_thd=None),
    'cityscapes': dict(resolution=560, logit_scale=40.0, prob_thd=0.0, area_thd=None),
    'ade20k': dict(resolution=336, logit_scale=40.0, prob_thd=0.0, area_thd=None),
}
SCLIP_WINDOW = dict(crop=224, stride=112, pamr_steps=0, pamr_dilations=(8, 16), templates='full')
SEGCLIP_WINDOW = dict(resolution=224, crop=224, stride=224, templates='simple')   # design.md §7.3


def head_settings(dataset: str, logit_scale: Optional[float] = None, prob_thd: Optional[float] = None,
                  area_thd: Optional[float] = None) -> dict:
    """DenseCLIPSegmentor's logit_scale / prob_thd / area_thd: the given ones, else ``dataset``'s SCLIP preset;
    area_thd 0 means off (None)."""
    p = SCLIP_PRESETS.get(dataset, SCLIP_PRESETS['voc20'])
    return dict(logit_scale=p['logit_scale'] if logit_scale is None else float(logit_scale),
                prob_thd=p['prob_thd'] if prob_thd is None else float(prob_thd),
                area_thd=p['area_thd'] if area_thd is None else (float(area_thd) or None))


def apply_method_defaults(args) -> None:
    """A script's ``--resolution`` / ``--crop_size`` / ``--stride`` / ``--templates`` left unset (None, see
    ``common.cli.add_method_args``) -> ``args.method``'s published values for ``args.dataset``."""
    defaults = method_defaults(args.method, args.dataset)
    for flag, key in (('resolution', 'resolution'), ('crop_size', 'crop'), ('stride', 'stride'),
                      ('templates', 'templates')):
        if getattr(args, flag, None) is None:
            setattr(args, flag, defaults[key])


def method_defaults(method: str, dataset: str) -> dict:
    """resolution / crop / stride / templates of ``method``'s published protocol on ``dataset`` (a split of your
    own gets SCLIP's no-background preset)."""
    if method == 'segclip':
        return dict(SEGCLIP_WINDOW)
    if method not in DENSE_METHODS:
        raise ValueError(f'unknown method {method!r}; choose segclip or one of {DENSE_METHODS}')
    return dict(resolution=SCLIP_PRESETS.get(dataset, SCLIP_PRESETS['voc20'])['resolution'],
                crop=SCLIP_WINDOW['crop'], stride=SCLIP_WINDOW['stride'], templates=SCLIP_WINDOW['templates'])


class DenseCLIPSegmentor:
    """Names every pixel with a plain CLIP (``modules.clip.CLIP``), SCLIP's way.

    Args:
        clip: a ``modules.clip.CLIP`` (or a DDP wrapper of one); put in eval mode by the caller.
        name_lines / name_file / classes: the class lines (names separated by ", "), a file of them, or the parsed
            per-class name lists (``synonyms.parse_name_lines``); give exactly one.
        templates: prompt set for every name ('full' = the 80 ImageNet prompts, as SCLIP); each prompt's
            embedding is L2-normalised, averaged, normalised again.
        method: 'sclip' (correlative self-attention in the last block) or 'clip' (CLIP's own last block).
        logit_scale: multiplies the cosine similarities before the softmax over names.
        prob_thd: pixels whose best class probability is below it become class 0.
        area_thd: None, or foreground classes (>= 1) predicted on at most area_thd x the foreground area are zeroed.
        pamr_steps / pamr_dilations: PAMR on the logits at the original size (0 steps = off).
        crop / stride: sliding window; batch_size: windows per visual forward (windows of several images pooled).
        amp_dtype: autocast dtype for the visual tower (GPU); the rest is float32.
    """

    def __init__(self, clip, name_lines: Optional[Sequence[str]] = None, name_file=None,
                 classes: Optional[Sequence[Sequence[str]]] = None, templates='full', method: str = 'sclip',
                 logit_scale: float = 40.0, prob_thd: float = 0.0, area_thd: Optional[float] = None,
                 pamr_steps: int = 0, pamr_dilations: Sequence[int] = (8, 16), crop: IntPair = 224,
                 stride: IntPair = 112, batch_size: int = 16, amp_dtype: Optional[torch.dtype] = None):
        if sum(x is not None for x in (name_lines, name_file, classes)) != 1:
            raise ValueError('give exactly one of name_lines, name_file, classes')
        if method not in DENSE_METHODS:
            raise ValueError(f'unknown method {method!r}; choose one of {DENSE_METHODS}')
        if area_thd is not None and not 0 <= area_thd < 1:
            raise ValueError(f'area_thd must be in [0, 1) or None, got {area_thd}')
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        if classes is None:
            classes = read_name_file(name_file) if name_file is not None else parse_name_lines(name_lines)
        self.classes = [list(c) for c in classes]
        self.query_words, idx = flatten(self.classes)
        self.model = unwrap_model(clip)
        self.device = model_device(self.model)
        self.query_idx = torch.tensor(idx, dtype=torch.long, device=self.device)                # [Q]
        self.query_features = build_text_embedding(self.model, self.query_words, templates,
                                                   normalize_each=True).to(self.device)         # [Q, D]
        self.method = method
        self.logit_scale, self.prob_thd, self.area_thd = float(logit_scale), float(prob_thd), area_thd
        self.pamr_steps, self.pamr_dilations = int(pamr_steps), tuple(int(d) for d in pamr_dilations)
        self.crop, self.stride, self.batch_size = crop, stride, int(batch_size)
        self.amp_dtype = amp_dtype

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> List[str]:
        """The first name of each class (its label in tables)."""
        return [c[0] for c in self.classes]

    def _autocast(self):
        if self.amp_dtype is None or self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ windows
    @torch.no_grad()
    def window_logits(self, crops: torch.Tensor) -> torch.Tensor:
        """crops [B, 3, h, w] -> cosine similarities [B, Q, h, w], the patch grid resized bilinearly to the crop.

        A side that is not a multiple of the patch size loses its remainder pixels in the visual pass (as the
        patch convolution does); the map is still spread over the whole crop."""
        p = self.model.patch_size
        h, w = crops.shape[-2:]
        if h < p or w < p:
            raise ValueError(f'a {h}x{w} window is smaller than one {p}x{p} patch')
        with self._autocast():
            feats = self.model.encode_dense(crops[..., :h - h % p, :w - w % p].to(self.device), self.method)
        feats = F.normalize(feats[:, 1:].float(), dim=-1)                    # [B, L, D]
        logits = (feats @ self.query_features.T).transpose(1, 2)             # [B, Q, L]
        logits = logits.reshape(*logits.shape[:2], h // p, w // p)
        return F.interpolate(logits, size=(h, w), mode='bilinear', align_corners=False)

    @torch.no_grad()
    def slide_logits(self, images: Union[torch.Tensor, Sequence[torch.Tensor]], crop: Optional[IntPair] = None,
                     stride: Optional[IntPair] = None, batch_size: Optional[int] = None) -> List[torch.Tensor]:
        """images [B,3,H,W] or a list of [3,H_i,W_i] -> list of window-averaged logits [Q, H_i, W_i]; crop /
        stride / batch_size default to the segmentor's."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        crop = self.crop if crop is None else crop
        stride = self.stride if stride is None else stride
        batch_size = self.batch_size if batch_size is None else int(batch_size)
        Q = self.query_features.shape[0]
        sums, counts, jobs = [], [], {}
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f'expected an image [3, H, W], got {tuple(img.shape)}')
            H, W = img.shape[-2:]
            sums.append(torch.zeros(Q, H, W, device=self.device))
            counts.append(torch.zeros(1, H, W, device=self.device))
            for y1, y2, x1, x2 in slide_windows(H, W, crop, stride):
                jobs.setdefault((y2 - y1, x2 - x1), []).append((i, y1, y2, x1, x2))
        for windows in jobs.values():              # windows of equal size batch together, in row-major order
            for start in range(0, len(windows), batch_size):
                part = windows[start:start + batch_size]
                crops = torch.stack([images[i][:, y1:y2, x1:x2] for i, y1, y2, x1, x2 in part])
                for (i, y1, y2, x1, x2), lg in zip(part, self.window_logits(crops)):
                    sums[i][:, y1:y2, x1:x2] += lg
                    counts[i][:, y1:y2, x1:x2] += 1
        return [s / c for s, c in zip(sums, counts)]

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
            idx = self.query_idx.to(probs.device)
            probs = torch.stack([probs[idx == c].amax(dim=0) for c in range(C)])
        if self.area_thd is not None:
            area = F.one_hot(probs.argmax(dim=0), C).to(probs.dtype).sum(dim=(0, 1))[1:]   # [C-1] foreground pixels
            keep = (area > self.area_thd * area.sum()).to(probs.dtype)
            probs[1:] *= keep[:, None, None]
        best, pred = probs.max(dim=0, keepdim=True)
        pred[best < self.prob_thd] = 0
        return probs, pred

    @torch.no_grad()
    def query_logits(self, image: torch.Tensor, ori_shape: Sequence[int]) -> torch.Tensor:
        """image [1, 3, h, w] (normalised, already at the evaluation resolution) -> [1, Q, H, W] at ``ori_shape``."""
        if image.dim() != 4 or image.shape[0] != 1:
            raise ValueError(f'expected one image [1, 3, h, w], got {tuple(image.shape)}')
        return self.resize_and_refine(self.slide_logits(image)[0], image[0], ori_shape)[None]

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
        images = list(images)
        logits = self.slide_logits(images, crop, stride, batch_size)
        preds = []
        for i, lg in enumerate(logits):
            size = tuple(lg.shape[-2:]) if out_sizes is None else out_sizes[i]
            preds.append(self.postprocess(self.resize_and_refine(lg, images[i], size))[1][0])
        return preds
