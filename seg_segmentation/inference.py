"""Zero-shot segmentation with a SegCLIP model (design.md §7.1 - §7.3).

    seg = ZeroShotSegmentor(model, class_names=['cat', 'dog'], bg_thresh=0.8)
    logits = seg.crop_logits(crops)                 # [B,3,h,w] -> [B,1+N,h,w]
    probs = seg.slide_probs(image, crop=224, stride=224)
    labels = seg.predict([image[0]], out_sizes=[(H, W)])[0]       # the evaluation's prediction, [H, W] int64

This is the only prediction path: the evaluation (seg_segmentation/evaluate.py) and the demo
(seg_segmentation/visualize.py) both call ``predict``, so a photo gets the labels the benchmark protocol gives it.

Each crop goes through the visual tower once (the 2022 code ran it twice: once for the assignment map, once for the
group embeddings), and the crops of one image - and of several images - are batched. Both give the same numbers
because the visual pass is per sample.
"""
import contextlib
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from modules.tokenization_clip import tokenize

from .classes import foreground_names, validate_class_names
from .templates import get_templates

IntPair = Union[int, Tuple[int, int]]


def _pair(x: IntPair) -> Tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


def unwrap_model(model):
    """The SegCLIP inside a DistributedDataParallel / DataParallel wrapper."""
    return getattr(model, 'module', model)


def model_device(model) -> torch.device:
    return next(unwrap_model(model).parameters()).device


@torch.no_grad()
def build_text_embedding(model, class_names: Sequence[str], templates='simple', chunk: int = 256,
                         normalize_each: bool = False) -> torch.Tensor:
    """class names -> [N, D]: every template filled with the name, encoded, averaged over templates (no per-template
    normalisation, as in 2022; ``normalize_each``: each template's embedding L2-normalised first, as SCLIP does),
    then L2-normalised. Tokens are the 77-long evaluation layout, cut after the last end-of-text token: the text
    tower is causal and reads its output at the end-of-text token, so the padding behind it cannot change the
    result (float noise aside) and a short prompt costs a fraction of 77 positions."""
    model = unwrap_model(model)
    names = validate_class_names(class_names)
    formats = get_templates(templates)
    texts = [t.format(name) for name in names for t in formats]
    tokens = tokenize(texts)                                                # [N*T, 77]
    tokens = tokens[:, :int(tokens.argmax(dim=-1).max()) + 1].to(model_device(model))   # EOT = the largest id
    embeds = torch.cat([model.encode_text(tokens[i:i + chunk]).float() for i in range(0, len(tokens), chunk)])
    embeds = embeds.reshape(len(names), len(formats), -1)                  # [N, T, D]
    if normalize_each:
        embeds = F.normalize(embeds, dim=-1)
    embeds = embeds.mean(dim=1)                                             # [N, D]
    return F.normalize(embeds, dim=-1)


def slide_windows(height: int, width: int, crop: IntPair = 224, stride: IntPair = 224) -> List[Tuple[int, int, int, int]]:
    """mmseg's sliding windows (y1, y2, x1, x2): the last row/column is shifted back inside the image; a side
    smaller than the crop gives one window covering that whole side. crop 0: one window, the whole image."""
    (ch, cw), (sh, sw) = _pair(crop), _pair(stride)
    if (ch, cw) == (0, 0):
        return [(0, height, 0, width)]
    if min(ch, cw, sh, sw) <= 0:
        raise ValueError(f'crop {crop} and stride {stride} must be positive')
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, height), min(c * sw + cw, width)
            windows.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return windows


class ZeroShotSegmentor:
    """Names image regions with text: SegCLIP's group tokens matched to class-name embeddings (design.md §7.2).

    Args:
        model: a SegCLIP (or a DDP wrapper of one); it is put in eval mode by the caller.
        class_names: names to encode; a leading 'background' is dropped (background comes from the threshold).
        text_embedding: [N, D] precomputed class embeddings (L2-normalised); overrides ``class_names``.
        templates: 'simple' | 'subset' | 'full' | 'identity' or a list of format strings.
        with_bg: add channel 0 = background where no class is confident enough.
        bg_thresh: the background threshold (VOC 0.80, Context 0.25, COCO-Object 0.65).
        amp_dtype: run the visual tower under autocast with this dtype (e.g. torch.bfloat16 on GPU); the head
            always computes in float32.
        classes: instead of ``class_names``, per label its names (synonyms, ``seg_segmentation/synonyms.py``):
            every name is a query and a class scores the best of its names; the image-level filter keeps the
            top-5 classes (a class by its best name). With background, the names of label 0 (other than the
            word 'background') are queries for the background, which then scores the larger of the threshold
            channel and those names. One name per label gives exactly the plain ``class_names`` result.
        pamr_steps / pamr_dilations: PAMR (``seg_segmentation/pamr.py``) on the logits at the output size in
            ``predict``, guided by the image resized to that size; 0 steps (the default) = off, as published.
    """

    def __init__(self, model, class_names: Optional[Sequence[str]] = None,
                 text_embedding: Optional[torch.Tensor] = None, templates='simple', with_bg: bool = True,
                 bg_thresh: float = 0.8, amp_dtype: Optional[torch.dtype] = None,
                 classes: Optional[Sequence[Sequence[str]]] = None, pamr_steps: int = 0,
                 pamr_dilations: Sequence[int] = (8, 16)):
        self.model = unwrap_model(model)
        self.device = model_device(self.model)
        self.query_class = None        # [Q] label index of each text row (None: row i is class i)
        if classes is not None:
            if class_names is not None or text_embedding is not None:
                raise ValueError('give classes, or class_names / text_embedding, not both')
            self.class_names, queries, query_class = _synonym_queries(classes, with_bg)
            text_embedding = build_text_embedding(self.model, queries, templates)
            if len(queries) != len(self.class_names):   # synonyms or background names: per-class reduction
                self.query_class = torch.tensor(query_class, dtype=torch.long, device=self.device)
        elif text_embedding is None:
            if class_names is None:
                raise ValueError('give class_names or text_embedding')
            self.class_names = foreground_names(validate_class_names(class_names))
            text_embedding = build_text_embedding(self.model, self.class_names, templates)
        else:
            if text_embedding.dim() != 2:
                raise ValueError(f'text_embedding must be [N, D], got {tuple(text_embedding.shape)}')
            self.class_names = None if class_names is None else foreground_names(class_names)
        self.text_embedding = text_embedding.detach().float().to(self.device)   # [N, D] (or [Q, D] with synonyms)
        self.with_bg = bool(with_bg)
        self.bg_thresh = float(bg_thresh)
        self.amp_dtype = amp_dtype
        self.pamr_steps, self.pamr_dilations = int(pamr_steps), tuple(int(d) for d in pamr_dilations)

    @property
    def num_classes(self) -> int:
        """Output channels: N (+1 with background)."""
        if self.query_class is not None:
            return len(self.class_names) + int(self.with_bg)
        return self.text_embedding.shape[0] + int(self.with_bg)

    # ------------------------------------------------------------------ per crop (design.md §7.2)
    def _autocast(self):
        if self.amp_dtype is None or self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def encode(self, crops: torch.Tensor):
        """One visual pass: crops [B,3,h,w] -> (soft_attn [B,G,L], group_embeds [B,G,D], image_embed [B,D]) fp32.

        A side that is not a multiple of the patch size (a window on an image thinner than the crop) loses its
        remainder pixels, as the 2022 patch convolution did; ``head`` still spreads the map over the whole crop."""
        p = self.model.patch_size
        h, w = crops.shape[-2:]
        if h < p or w < p:
            raise ValueError(f'a {h}x{w} window is smaller than one {p}x{p} patch')
        crops = crops[..., :h - h % p, :w - w % p]
        with self._autocast():
            out = self.model.encode_image(crops.to(self.device, non_blocking=True))
        return out.soft_attn.float(), out.group_embeds.float(), out.image_embed.float()

    @torch.no_grad()
    def head(self, soft_attn: torch.Tensor, group_embeds: torch.Tensor, image_embed: torch.Tensor,
             size: Tuple[int, int]) -> torch.Tensor:
        """Visual outputs of B crops of ``size`` (h, w) -> logits [B, C, h, w]."""
        h, w = size
        p = self.model.patch_size
        B, G, L = soft_attn.shape
        gh, gw = h // p, w // p
        if gh * gw != L:
            raise ValueError(f'{L} patches do not tile a {h}x{w} crop with patch size {p}')
        # assignment map: soft assignment resized to pixels, then each pixel's best center
        amap = F.interpolate(soft_attn.reshape(B, G, gh, gw), size=(h, w), mode='bilinear', align_corners=False)
        center = amap.argmax(dim=1)                                                # [B, h, w]

        text = self.text_embedding
        s = self.model.logit_scale_value().float()
        gaff = (F.normalize(group_embeds, dim=-1) @ text.T) * s                   # [B, G, N]
        pre = gaff.softmax(dim=-1)
        img_prob = ((F.normalize(image_embed, dim=-1) @ text.T) * s).softmax(dim=-1)   # [B, N]
        if self.query_class is None:
            keep = torch.zeros_like(img_prob, dtype=torch.bool)
            keep.scatter_(1, img_prob.topk(k=min(5, text.shape[0]), dim=-1).indices, True)
        else:   # the top-5 classes by their best name; all names of a kept class stay
            per_class = _max_per_class(img_prob, self.query_class, dim=1)        # [B, K]
            top = torch.zeros_like(per_class, dtype=torch.bool)
            top.scatter_(1, per_class.topk(k=min(5, per_class.shape[1]), dim=-1).indices, True)
            keep = top[:, self.query_class - int(self.query_class.min())]        # [B, Q]
        # only the image's top-5 classes may win a group; re-weighted by the unfiltered group-class softmax
        gaff = gaff.masked_fill(~keep[:, None, :], float('-inf')).softmax(dim=-1) * pre   # [B, G, N]

        # one-hot(center) @ gaff == picking each pixel's center row (exact: the other terms are 0 * finite)
        fg = torch.gather(gaff, 1, center.reshape(B, h * w, 1).expand(-1, -1, gaff.shape[-1]))  # [B, hw, N]
        fg = fg.transpose(1, 2).reshape(B, -1, h, w)                              # [B, N, h, w]
        stuff = None
        if self.query_class is not None:                                          # [B, Q, h, w] -> [B, N, h, w]
            if int(self.query_class.min()) < 0:
                stuff = fg[:, self.query_class < 0].amax(dim=1)                   # background names [B, h, w]
                fg = fg[:, self.query_class >= 0]
                gaff = gaff[..., self.query_class >= 0]
            fg = _max_per_class(fg, self.query_class[self.query_class >= 0], dim=1)
        if not self.with_bg:
            return fg
        thresh = gaff.flatten(1).amax(dim=1).clamp(max=self.bg_thresh)           # min(bg_thresh, max(gaff)) [B]
        bg = (fg.amax(dim=1) < thresh[:, None, None]).to(fg.dtype)              # [B, h, w]
        if stuff is not None:
            bg = torch.maximum(bg, stuff)
        return torch.cat([bg[:, None], fg], dim=1)

    @torch.no_grad()
    def crop_logits(self, crops: torch.Tensor) -> torch.Tensor:
        """crops [B, 3, h, w] (normalised) -> [B, C, h, w]; C = 1 + N with background, else N."""
        return self.head(*self.encode(crops), size=tuple(crops.shape[-2:]))

    # ------------------------------------------------------------------ whole images (design.md §7.3)
    @torch.no_grad()
    def slide_logits(self, images: Union[torch.Tensor, Sequence[torch.Tensor]], crop: IntPair = 224,
                     stride: IntPair = 224, batch_size: int = 16, head_chunk: int = 8) -> List[torch.Tensor]:
        """Window-averaged logits of one or several images.

        images: [B,3,H,W] or a list of [3,H_i,W_i] (sizes may differ) -> list of [C, H_i, W_i] on the model device.
        The windows of all images are pooled and run ``batch_size`` at a time. A side shorter than one patch (a
        photo thinner than 1/14 of its length) is padded with zeros - the mean colour - to one patch, and the
        padding cut off again; any longer side follows mmseg's windows (``slide_windows``).
        """
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        C, p = self.num_classes, self.model.patch_size
        sizes, padded, sums, counts, jobs = [], [], [], [], {}
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f'expected an image [3, H, W], got {tuple(img.shape)}')
            sizes.append(tuple(img.shape[-2:]))
            # whole images go to the device once (from the loader's pinned memory); the crops are cut there
            img = img.to(self.device, non_blocking=True)
            if img.shape[-2] < p or img.shape[-1] < p:
                img = F.pad(img, (0, max(p - img.shape[-1], 0), 0, max(p - img.shape[-2], 0)))
            padded.append(img)
            H, W = img.shape[-2:]
            sums.append(torch.zeros(C, H, W, device=self.device))
            counts.append(torch.zeros(1, H, W, device=self.device))
            for y1, y2, x1, x2 in slide_windows(H, W, crop, stride):
                jobs.setdefault((y2 - y1, x2 - x1), []).append((i, y1, y2, x1, x2))
        for size, windows in jobs.items():          # windows of equal size batch together
            for start in range(0, len(windows), batch_size):
                part = windows[start:start + batch_size]
                crops = torch.stack([padded[i][:, y1:y2, x1:x2] for i, y1, y2, x1, x2 in part])
                soft, groups, embed = self.encode(crops)
                for k in range(0, len(part), head_chunk):   # bounded memory: [chunk, C, h, w] at a time
                    logits = self.head(soft[k:k + head_chunk], groups[k:k + head_chunk],
                                       embed[k:k + head_chunk], size)
                    for (i, y1, y2, x1, x2), lg in zip(part[k:k + head_chunk], logits):
                        sums[i][:, y1:y2, x1:x2] += lg
                        counts[i][:, y1:y2, x1:x2] += 1
        return [(s / c)[:, :h, :w] for s, c, (h, w) in zip(sums, counts, sizes)]

    @torch.no_grad()
    def slide_probs(self, image: torch.Tensor, crop: IntPair = 224, stride: IntPair = 224,
                    batch_size: int = 16) -> torch.Tensor:
        """image [1, 3, H, W] -> [1, C, H, W]: softmax over classes of the window-averaged logits."""
        logits = self.slide_logits(image, crop, stride, batch_size)
        return torch.stack(logits).softmax(dim=1)

    @torch.no_grad()
    def predict(self, images: Union[torch.Tensor, Sequence[torch.Tensor]], out_sizes: Optional[Sequence] = None,
                crop: IntPair = 224, stride: IntPair = 224, batch_size: int = 16,
                max_elements: Optional[int] = None) -> List[torch.Tensor]:
        """Label maps: window-averaged logits resized (bilinear) to ``out_sizes`` (default: input size), softmax,
        argmax -> list of [H_i, W_i] int64, as mmseg's slide inference did. ``max_elements`` bounds the memory of
        the resize (see ``upsample_labels``; None = mmseg's one full-size resize, the evaluation's default)."""
        logits = self.slide_logits(images, crop, stride, batch_size)
        sizes = [tuple(lg.shape[-2:]) if out_sizes is None else tuple(int(v) for v in out_sizes[i][:2])
                 for i, lg in enumerate(logits)]
        if self.pamr_steps > 0:   # refine at the output size, then softmax / argmax there
            logits = [refine_with_pamr(lg, images[i], size, self.pamr_steps, self.pamr_dilations)
                      for i, (lg, size) in enumerate(zip(logits, sizes))]
        return [upsample_labels(lg, size, max_elements) for lg, size in zip(logits, sizes)]

    def predict_labels(self, *args, **kwargs) -> List[torch.Tensor]:
        """``predict``, under the name every segmentor's label prediction has (the evaluation and the demo call
        it; TrainingFreeSegmentor's ``predict`` returns logits too)."""
        return self.predict(*args, **kwargs)


def _synonym_queries(classes: Sequence[Sequence[str]], with_bg: bool):
    """Per-label names -> (foreground class names, query names, class of each query: 0..N-1, -1 = background)."""
    classes = [list(c) for c in classes]
    fg = classes[1:] if with_bg else classes
    validate_class_names([c[0] for c in fg] if fg else [], 'class names')
    queries, query_class = [], []
    if with_bg:
        for n in classes[0]:
            if n.strip().lower() != 'background':   # the word itself is never encoded (design.md §7.1)
                queries.append(n)
                query_class.append(-1)
    for i, names in enumerate(fg):
        queries.extend(names)
        query_class.extend([i] * len(names))
    return [c[0] for c in fg], queries, query_class


def _max_per_class(x: torch.Tensor, query_class: torch.Tensor, dim: int) -> torch.Tensor:
    """x [..., Q, ...] -> [..., K, ...]: per class (ids min..max of ``query_class``) the max over its queries."""
    lo = int(query_class.min())
    return torch.stack([x.index_select(dim, (query_class == c).nonzero()[:, 0]).amax(dim=dim)
                        for c in range(lo, int(query_class.max()) + 1)], dim=dim)


def refine_with_pamr(logits: torch.Tensor, image: torch.Tensor, size: Sequence[int], steps: int,
                     dilations: Sequence[int]) -> torch.Tensor:
    """logits [C, h, w] of ``image`` [3, h, w] -> PAMR-refined logits [C, H, W] at ``size``: both resized
    bilinearly to that size, then PAMR guided by the resized image (design.md §12; SCLIP's order)."""
    from .pamr import pamr
    H, W = int(size[0]), int(size[1])
    up = logits[None] if (H, W) == tuple(logits.shape[-2:]) else F.interpolate(
        logits[None], size=(H, W), mode='bilinear', align_corners=False)
    guide = F.interpolate(image[None].to(up.device, up.dtype), size=(H, W), mode='bilinear', align_corners=False)
    return pamr(guide, up, steps, dilations)[0]


# ---------------------------------------------------------------------------------------------------------------
# Logits -> labels at the photo's size

def upsample_labels(logits: torch.Tensor, size: Sequence[int], max_elements: Optional[int] = None) -> torch.Tensor:
    """logits [C, h, w] -> labels [H, W] int64 (same device): bilinear resize (align_corners=False) to ``size``,
    softmax over C, argmax - mmseg's post-processing.

    With ``max_elements`` and C*H*W above it, the full-size [C, H, W] float copy (6 GB for a 24 MP photo and 60
    classes) is never made: an output pixel is a convex blend of four source pixels, so where those four pick the
    same class the blend picks it too and the label is copied; only pixels between disagreeing source pixels are
    blended, a band of rows at a time, with PyTorch's weights and nesting (the width pass by F.interpolate, then
    rows). The result equals the full resize up to float rounding at exact ties (tests/test_vis_draw.py).
    """
    H, W = int(size[0]), int(size[1])
    C, h, w = logits.shape
    if (H, W) == (h, w):
        return logits.softmax(dim=0).argmax(dim=0)
    if max_elements is None or C * H * W <= max_elements:
        up = F.interpolate(logits[None], size=(H, W), mode='bilinear', align_corners=False)[0]
        return up.softmax(dim=0).argmax(dim=0)
    return torch.from_numpy(_upsample_argmax_bounded(logits.detach().float().cpu(), H, W, max_elements)).to(
        device=logits.device, dtype=torch.int64)


def _bilinear_source(out_size: int, in_size: int):
    """Per output index: the two source indices and their weights, computed as PyTorch's upsample_bilinear2d
    does with align_corners=False (float32, source index clamped at 0)."""
    scale = torch.tensor(np.float32(in_size) / np.float32(out_size))
    src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    l1 = (src - i0.float()).clamp(0, 1)
    return i0.numpy(), i1.numpy(), (1.0 - l1), l1


def _upsample_argmax_bounded(scores: torch.Tensor, H: int, W: int, max_elements: int) -> np.ndarray:
    """CPU float scores [C, h, w] -> labels [H, W] (uint8, int32 beyond 256 classes); see ``upsample_labels``."""
    C, h, w = scores.shape
    dtype = np.uint8 if C <= 256 else np.int32
    src_label = scores.argmax(dim=0).numpy().astype(dtype)                          # [h, w]
    r1, c1 = np.minimum(np.arange(h) + 1, h - 1), np.minimum(np.arange(w) + 1, w - 1)
    settled = ((src_label == src_label[r1]) & (src_label == src_label[:, c1])
               & (src_label == src_label[r1][:, c1]))                                # [h, w] four corners agree
    y0, y1, ly0, ly1 = _bilinear_source(H, h)
    x0 = _bilinear_source(W, w)[0]
    out = src_label[y0[:, None], x0[None, :]]                                        # [H, W]
    # width pass (row weights 1 and 0 reproduce the kernel's inner blend exactly): [h, W, C], classes contiguous
    wide = F.interpolate(scores[None], size=(h, W), mode='bilinear', align_corners=False)[0].permute(1, 2, 0)
    wide = wide.contiguous()
    starts = np.searchsorted(y0, np.arange(h + 1))                                   # output rows of source row i
    for i in np.nonzero(~settled.all(axis=1))[0]:
        cols = torch.from_numpy(np.nonzero(~settled[i][x0])[0])                     # output columns to blend
        top, bottom = wide[i, cols], wide[y1[starts[i]] if starts[i] < H else i, cols]   # [n, C]
        step = max(1, max_elements // max(1, len(cols) * C))
        for r in range(starts[i], starts[i + 1], step):
            rows = slice(r, min(r + step, starts[i + 1]))
            blend = ly0[rows, None, None] * top + ly1[rows, None, None] * bottom     # [rows, n, C]
            out[rows, cols.numpy()] = blend.argmax(dim=-1).numpy()
    return out
