"""The segmentation demo (design.md §8): any photo, any vocabulary -> labels, class shares, center assignment.

    demo = SegmentationDemo.from_checkpoint("segclip.bin", ["cat", "wall", "floor"])   # or SegmentationDemo(model, ...)
    pred = demo.predict(read_image_bgr("photo.jpg"), with_groups=True)
    pred.labels     # [H, W] label ids at the photo's size: 0 = background, then the classes in order
    pred.classes    # the labels present: id, name, pixels, share, color (largest first)
    pred.groups     # [H, W] index of the winning learnable center (with_groups), else None

``predict`` is the evaluation's prediction (``ZeroShotSegmentor.predict``, design.md §7.3) on the evaluation's
image transform (seg_segmentation/preprocessing.py): a photo gets the labels the benchmark protocol would give it
(tests/test_vis_demo.py checks that they are equal). ``run_visualization`` writes the pictures and label files for
a list of photos; drawing is in ``drawing.py``, files in ``outputs.py``, input files in ``inputs.py``.
This module imports neither mmseg nor the training code.
"""
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from common.errors import UsageError
from common.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReadError, read_image_bgr
from .drawing import GROUP_MODES, class_palette, render
from .inputs import unique_names
from .outputs import output_path, save_jpg, save_label_png, too_long_names, write_json

# Largest float copy (C x H x W elements) made when labels are resized to the photo's size: 32 MB; bigger photos go
# through the memory-bounded resize (seg_segmentation/inference.py, upsample_labels).
DEMO_MAX_ELEMENTS = 1 << 23


class Prediction(NamedTuple):
    labels: np.ndarray              # [H, W] label ids (uint8; int32 beyond 256 labels)
    classes: List[Dict]             # label_summary(labels, ...): the labels present, largest first
    groups: Optional[np.ndarray]    # [H, W] winning center per pixel, or None


def label_summary(labels: np.ndarray, label_names: Sequence[str], palette: np.ndarray) -> List[Dict]:
    """Labels present in ``labels`` with pixel count, share of the image and colour, largest first."""
    counts = np.bincount(labels.ravel(), minlength=len(label_names))
    rows = [{"id": int(i), "name": label_names[i], "pixels": int(counts[i]),
             "share": round(float(counts[i]) / labels.size, 6), "color": [int(c) for c in palette[i]]}
            for i in np.nonzero(counts)[0]]
    return sorted(rows, key=lambda r: -r["pixels"])


class SegmentationDemo:
    """A SegCLIP model + a vocabulary -> per-pixel labels and center assignments for photos of any size.

    Args:
        model: a SegCLIP in eval mode (any device, fp32 or bf16: modules/precision.py), or with a training-free
            ``method`` that method (``seg_segmentation.methods``; design.md §12, §13).
        class_names: the vocabulary, without 'background' (background comes from ``bg_thresh`` when ``with_bg``;
            with a training-free method from the word 'background' and ``prob_thd``).
        crop / stride / resolution / max_long / templates: the evaluation's settings (design.md §7.3; crop 0 =
            the whole image at once).
        max_elements: memory bound of the resize to the photo's size (None: one full-size resize).
        method / head: 'segclip' or a training-free method's name; ``head`` holds TrainingFreeSegmentor's
            logit_scale / prob_thd / area_thd, PAMR settings (pamr_steps / pamr_dilations also apply to SegCLIP)
            and the method's knobs.
    """

    def __init__(self, model, class_names: Sequence[str], with_bg: bool = True, bg_thresh: float = 0.8,
                 templates: str = "simple", crop: int = 224, stride: int = 224, resolution: int = 224,
                 max_long: int = 2048, max_elements: Optional[int] = DEMO_MAX_ELEMENTS, method: str = "segclip",
                 head: Optional[Dict] = None, synonyms: Optional[Sequence[Sequence[str]]] = None):
        patch = model.patch_size
        if method == "segclip" and crop % patch:
            raise UsageError(f"crop size {crop} must be a multiple of the patch size {patch}")
        self.model = model
        self.method, self.head = method, dict(head or {})
        self.templates = templates
        self.crop, self.stride, self.resolution, self.max_long = crop, stride, resolution, max_long
        self.max_elements = max_elements
        self.set_vocabulary(class_names, with_bg, bg_thresh, synonyms)

    @classmethod
    def from_checkpoint(cls, checkpoint, class_names: Sequence[str], device="cpu", precision: str = "fp32",
                        **settings) -> "SegmentationDemo":
        """A SegCLIP checkpoint file (modules/checkpoint.py, built without random initialisation) -> demo."""
        from modules.checkpoint import load_segclip
        model = load_segclip(checkpoint, device=device, use_vision_mae_recon=False, precision=precision)
        return cls(model, class_names, **settings)

    def set_vocabulary(self, class_names: Sequence[str], with_bg: bool = True, bg_thresh: float = 0.8,
                       synonyms: Optional[Sequence[Sequence[str]]] = None) -> None:
        """Change the vocabulary (encodes the class names once; the model is kept). ``synonyms``: per class its
        names, replacing ``class_names`` (seg_segmentation/synonyms.py)."""
        from .inference import ZeroShotSegmentor
        classes = [list(c) for c in synonyms] if synonyms is not None else [[n] for n in class_names]
        if self.method == "segclip":
            pamr = {k: self.head[k] for k in ("pamr_steps", "pamr_dilations") if k in self.head}
            self.segmentor = ZeroShotSegmentor(self.model, classes=([["background"]] if with_bg else []) + classes,
                                               templates=self.templates, with_bg=with_bg, bg_thresh=bg_thresh,
                                               **pamr)
        else:
            from .dense import TrainingFreeSegmentor
            self.segmentor = TrainingFreeSegmentor(self.model, classes=([["background"]] if with_bg else []) + classes,
                                                   templates=self.templates, crop=self.crop, stride=self.stride,
                                                   **self.head)
        self.class_names = [c[0] for c in classes]
        self.with_bg, self.bg_thresh = bool(with_bg), float(bg_thresh)
        self.label_names = (["background"] if with_bg else []) + self.class_names
        self.palette = class_palette(len(self.label_names), with_bg)

    def preprocess(self, bgr: np.ndarray):
        """uint8 BGR [H, W, 3] -> the model's input [3, h, w] (the evaluation's transform)."""
        from .preprocessing import eval_image_tensor
        return eval_image_tensor(bgr, self.resolution, self.max_long)

    def labels(self, image, size) -> np.ndarray:
        """image [3, h, w] (preprocessed) -> labels [H, W] at ``size`` (the evaluation's prediction)."""
        pred = self.segmentor.predict_labels([image], out_sizes=[size], crop=self.crop, stride=self.stride,
                                             max_elements=self.max_elements)[0]
        return pred.cpu().numpy().astype(np.uint8 if len(self.label_names) <= 256 else np.int32)

    def groups(self, image, size) -> np.ndarray:
        """image [3, h, w] -> index of the winning center per pixel [H, W].

        As in 2022: one pass over the whole resized image, whose patch grid covers floor(h/16) x floor(w/16)
        patches (the 2022 patch conv dropped the remainder; here it is cropped; a side thinner than one patch is
        padded with the mean colour), soft assignment stretched bilinearly over the photo, argmax over centers."""
        import torch.nn.functional as F
        from .inference import upsample_labels
        if self.method != "segclip":
            raise UsageError(f"the center views ({', '.join(GROUP_MODES)}) exist only for SegCLIP, not --method "
                             f"{self.method}")
        p = self.model.patch_size
        h, w = image.shape[-2:]
        if h < p or w < p:
            image = F.pad(image, (0, max(p - w, 0), 0, max(p - h, 0)))
        gh, gw = image.shape[-2] // p, image.shape[-1] // p
        soft, _, _ = self.segmentor.encode(image[None, :, :gh * p, :gw * p])   # [1, G, gh*gw]
        groups = upsample_labels(soft[0].reshape(-1, gh, gw), size, self.max_elements)
        return groups.cpu().numpy().astype(np.uint8)

    def predict(self, bgr: np.ndarray, with_groups: bool = False) -> Prediction:
        """uint8 BGR [H, W, 3] (e.g. ``read_image_bgr``; reverse an RGB array with ``rgb[..., ::-1]``) -> Prediction."""
        size = bgr.shape[:2]
        image = self.preprocess(bgr)
        labels = self.labels(image, size)
        groups = self.groups(image, size) if with_groups else None
        return Prediction(labels, label_summary(labels, self.label_names, self.palette), groups)


def load_demo_model(args, device):
    """The model the demo flags ask for (common/cli.py's checkpoint, method and inference groups), read once ->
    (model, head settings for SegmentationDemo, checkpoint path or None). main_seg_vis.py and demo/app.py both
    call this, so the page and the command line segment with the same model. The window flags left unset
    (``args.resolution`` / ``crop_size`` / ``stride`` / ``templates``) are filled with the method's preset.

    segclip: ``--init_model`` (the released checkpoint, downloaded when missing, when absent). A training-free
    method: the CLIP of ``--pretrained_clip_name`` (and its second vision model, ``--vfm``) with the method's preset
    for ``--dataset`` (voc for your own classes)."""
    from modules.checkpoint import load_segclip, segclip_checkpoint_keys
    from common.download import resolve_segclip_checkpoint
    from .dense import resolve_settings
    settings = resolve_settings(args.method, getattr(args, "dataset", "voc"), args)
    for flag, key in (("resolution", "resolution"), ("crop_size", "crop"), ("stride", "stride"),
                      ("templates", "templates")):
        setattr(args, flag, settings.pop(key))
    head = settings
    if args.method == "segclip":
        ckpt = resolve_segclip_checkpoint(args.init_model, cache_dir=args.cache_dir, progress=not args.no_progress,
                                          expected_keys=segclip_checkpoint_keys)
        model = load_segclip(ckpt, device=device, use_vision_mae_recon=False, precision=args.precision)
        if args.first_stage_layer is not None and args.first_stage_layer != model.config.first_stage_layer:
            raise UsageError(f"--first_stage_layer {args.first_stage_layer} does not match the checkpoint "
                             f"({model.config.first_stage_layer}); leave the flag out")
        return model, head, Path(ckpt)
    from .methods import load_method
    if args.init_model is not None:
        raise UsageError(f"--init_model is a SegCLIP checkpoint; --method {args.method} runs the CLIP of "
                         "--pretrained_clip_name")
    model = load_method(args.method, args.pretrained_clip_name, vfm=getattr(args, "vfm", None),
                        cache_dir=args.cache_dir, device=device, precision=args.precision,
                        activation=args.clip_activation)
    head["area_thd"] = head["area_thd"] or None
    return model, head, None


def run_visualization(demo: SegmentationDemo, inputs: Sequence[Path], output_dir: Path,
                      modes: Sequence[str] = ("input_pred_label",), progress: bool = True,
                      max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> Dict:
    """Segment every input and write, per image ``name``: ``vis_imgs/<mode>/<mode>_<name>.jpg`` for each mode
    (``.png`` label ids for ``pred``), ``labels/<name>.png`` (palette PNG of label ids) and ``labels/<name>.json``
    (classes present with pixel share). Every file is written atomically; temporaries a killed earlier run left in
    these folders are removed first. Unreadable files, images above ``max_image_pixels`` and files whose names
    make output names too long for the file system are skipped and counted. Returns {'written': [names], 'skipped': [(path, reason)], 'files': [paths]}."""
    from tqdm import tqdm
    from common.fileio import remove_stale_temporaries
    output_dir = Path(output_dir)
    for folder in [output_dir / "labels"] + [output_path(output_dir, m, "x").parent for m in modes]:
        remove_stale_temporaries(folder)
    with_groups = any(m in GROUP_MODES for m in modes)
    report = {"written": [], "skipped": [], "files": []}
    for path, name in tqdm(list(zip(inputs, unique_names(inputs))), desc="segmenting", unit="img",
                           disable=not progress or len(inputs) < 2):
        names_problem = too_long_names([output_path(output_dir, m, name) for m in modes]
                                       + [output_dir / "labels" / f"{name}{ext}" for ext in (".png", ".json")])
        if names_problem:     # checked before any work: a file system refuses the name only when it is written
            report["skipped"].append((str(path), f"{path}: {names_problem}"))
            continue
        try:
            bgr = read_image_bgr(path, max_image_pixels)
            pred = demo.predict(bgr, with_groups)
        except ImageReadError as e:
            report["skipped"].append((str(path), str(e)))
            continue
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        del bgr
        for mode in modes:
            target = output_path(output_dir, mode, name)
            if mode == "pred":
                save_label_png(target, pred.labels, demo.palette)
            else:
                save_jpg(target, render(mode, rgb, pred.labels, pred.groups, demo.label_names, demo.palette,
                                        demo.with_bg))
            report["files"].append(str(target))
        png = output_dir / "labels" / f"{name}.png"
        save_label_png(png, pred.labels, demo.palette)
        summary = {"image": str(path), "height": int(pred.labels.shape[0]), "width": int(pred.labels.shape[1]),
                   "label_png": png.name, "vocabulary": demo.label_names, "background": demo.with_bg,
                   "bg_thresh": demo.bg_thresh if demo.with_bg else None, "classes": pred.classes}
        write_json(output_dir / "labels" / f"{name}.json", summary)
        report["files"] += [str(png), str(output_dir / "labels" / f"{name}.json")]
        report["written"].append(name)
    return report
