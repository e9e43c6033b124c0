"""The zero-shot benchmarks on mmsegmentation 1.x: its dataset classes (file layouts, split files), its loading and
keep-ratio resize transforms, and the SegCLIP test protocol (design.md §7.3, §7.4).

    ds = ZeroShotSegDataset('voc', 'data/VOCdevkit/VOC2012')       # checks the layout, lists every sample
    sample = ds[0]    # dict(img [3,h,w] float normalised, gt [H,W] int64 (255 = ignore), ori_shape, img_path)

``custom`` is any split of your own in the VOC layout whose label i is class i of the class list you give
(e.g. the quickstart's synthetic split); every other name is a benchmark with its fixed class list.
Images pass the evaluation's transform (seg_segmentation/preprocessing.py, shared with the demo); image and label
files are checked from their headers before decoding (pixel limit, single-channel labels).
"""
import logging
import os.path as osp
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import mmcv_compat  # noqa: F401  (before any mmseg import: mmcv-lite lacks the compiled ops)
from .classes import COCO_OBJECT_CLASSES
from .preprocessing import eval_image_tensor
from common.errors import SegCLIPError, UsageError
from common.images import (DEFAULT_MAX_IMAGE_PIXELS, LABEL_MODES, ImageReadError, ImageTooLargeError,
                           check_image_size, read_label_map)

logger = logging.getLogger(__name__)

CUSTOM_DATASET = 'custom'


@dataclass(frozen=True)
class DatasetLayout:
    mmseg_class: str              # class name in mmseg.datasets (or COCOObjectDataset below)
    img_dir: str                  # relative to the data root
    ann_dir: str
    split: str = ''               # split file relative to the data root ('' = every image in img_dir)
    img_suffix: str = '.jpg'
    seg_map_suffix: str = '.png'
    reduce_zero_label: bool = False
    default_root: str = ''        # mmseg's conventional location, relative to the working directory
    subdirs: Tuple[str, ...] = () # tried below --data_root when it points one level too high

    def describe(self, root: str) -> str:
        lines = [f'{root}/', f'  {self.img_dir}/   (*{self.img_suffix} images)',
                 f'  {self.ann_dir}/   (*{self.seg_map_suffix} label maps, 255 = ignore)']
        if self.split:
            lines.append(f'  {self.split}   (one image name per line, without suffix)')
        return '\n'.join(lines)


_VOC = dict(img_dir='JPEGImages', ann_dir='SegmentationClass', split='ImageSets/Segmentation/val.txt',
            default_root='data/VOCdevkit/VOC2012', subdirs=('VOC2012', 'VOCdevkit/VOC2012'))
_CONTEXT = dict(img_dir='JPEGImages', ann_dir='SegmentationClassContext',
                split='ImageSets/SegmentationContext/val.txt', default_root='data/VOCdevkit/VOC2010',
                subdirs=('VOC2010', 'VOCdevkit/VOC2010'))
_COCO = dict(img_dir='images/val2017', ann_dir='annotations/val2017', default_root='data/coco_stuff164k',
             subdirs=('coco_stuff164k',))

LAYOUTS: Dict[str, DatasetLayout] = {
    'voc': DatasetLayout('PascalVOCDataset', **_VOC),
    CUSTOM_DATASET: DatasetLayout('CustomSegDataset', img_dir='JPEGImages', ann_dir='SegmentationClass',
                                  split='ImageSets/Segmentation/val.txt'),
    'voc20': DatasetLayout('PascalVOCDataset', reduce_zero_label=True, **_VOC),
    'context': DatasetLayout('PascalContextDataset', **_CONTEXT),
    'context59': DatasetLayout('PascalContextDataset59', reduce_zero_label=True, **_CONTEXT),
    'coco': DatasetLayout('COCOObjectDataset', seg_map_suffix='_instanceTrainIds.png', **_COCO),
    'coco_stuff': DatasetLayout('COCOStuffDataset', seg_map_suffix='_labelTrainIds.png', **_COCO),
    'cityscapes': DatasetLayout('CityscapesDataset', 'leftImg8bit/val', 'gtFine/val', img_suffix='_leftImg8bit.png',
                                seg_map_suffix='_gtFine_labelTrainIds.png', default_root='data/cityscapes',
                                subdirs=('cityscapes',)),
    'ade20k': DatasetLayout('ADE20KDataset', 'images/validation', 'annotations/validation', reduce_zero_label=True,
                            default_root='data/ade/ADEChallengeData2016',
                            subdirs=('ADEChallengeData2016', 'ade/ADEChallengeData2016')),
}


class DatasetError(SegCLIPError, RuntimeError):
    """A data root that is missing, laid out wrongly, or holds unreadable / unpaired files."""


def _mmseg_dataset_class(name: str):
    import mmseg.datasets as mds
    if name == 'COCOObjectDataset':
        return _coco_object_class()
    if name == 'CustomSegDataset':
        return _custom_class()
    return getattr(mds, name)


def _custom_class():
    """mmseg's plain dataset; it insists on class names in test mode, which only our class list gives meaning to
    (no label remapping happens: label i stays i)."""
    from mmseg.datasets import BaseSegDataset

    class CustomSegDataset(BaseSegDataset):
        METAINFO = dict(classes=('label ids as given',))
    return CustomSegDataset


_COCO_OBJECT_CLS = None


def _coco_object_class():
    """COCO-Object: COCO-Stuff-164k images with ``*_instanceTrainIds.png`` labels (0 = background, 1..80 things);
    made by ``preprocess/convert_coco_object.py``. mmseg has no class for it."""
    global _COCO_OBJECT_CLS
    if _COCO_OBJECT_CLS is None:
        from mmseg.datasets import BaseSegDataset

        class COCOObjectDataset(BaseSegDataset):
            METAINFO = dict(classes=tuple(COCO_OBJECT_CLASSES))

            def __init__(self, img_suffix='.jpg', seg_map_suffix='_instanceTrainIds.png', **kwargs):
                super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix, **kwargs)

        _COCO_OBJECT_CLS = COCOObjectDataset
    return _COCO_OBJECT_CLS


def resolve_data_root(dataset: str, data_root: Optional[str]) -> str:
    """The folder that holds ``dataset``'s layout: ``data_root`` itself or one of its conventional sub-folders
    (e.g. ``VOCdevkit/VOC2012``). Raises DatasetError describing the expected layout."""
    if dataset not in LAYOUTS:
        raise DatasetError(f'unknown dataset {dataset!r}; choose one of {sorted(LAYOUTS)}')
    layout = LAYOUTS[dataset]
    root = data_root or layout.default_root
    if not root:
        raise DatasetError(f'{dataset}: give the data root. Expected layout:\n' + layout.describe('DATA_ROOT'))
    if not osp.isdir(root):
        raise DatasetError(f'{dataset}: data root {root!r} does not exist. Expected layout:\n'
                           + layout.describe(root))
    for cand in ('',) + layout.subdirs:
        r = osp.join(root, cand) if cand else root
        if osp.isdir(osp.join(r, layout.img_dir)) and osp.isdir(osp.join(r, layout.ann_dir)) and \
                (not layout.split or osp.isfile(osp.join(r, layout.split))):
            return r
    missing = [p for p in (layout.img_dir, layout.ann_dir, layout.split)
               if p and not osp.exists(osp.join(root, p))]
    raise DatasetError(f'{dataset}: {root!r} is not laid out as expected (missing: {", ".join(missing)}). '
                       'Expected layout:\n' + layout.describe(root))


def dataset_folders(dataset: str, data_root: Optional[str]) -> Tuple[str, str]:
    """(image folder, annotation folder) of ``dataset`` under its data root (``resolve_data_root``)."""
    root = resolve_data_root(dataset, data_root)
    layout = LAYOUTS[dataset]
    return osp.join(root, layout.img_dir), osp.join(root, layout.ann_dir)


def refuse_output_inside_dataset(path: str, flag: str, dataset: str, data_root: Optional[str]) -> None:
    """UsageError when the output ``path`` (a file or folder) lies in ``dataset``'s image or annotation folder:
    predictions written there would replace or sit among the ground truth (the next evaluation would score them)."""
    target = osp.realpath(path)
    for what, folder in zip(('image', 'annotation'), dataset_folders(dataset, data_root)):
        folder = osp.realpath(folder)
        if osp.commonpath([target, folder]) == folder:
            raise UsageError(f'{flag} {path} is inside the {what} folder of the {dataset} dataset ({folder}); '
                             'writing there could replace its files: choose a folder outside the dataset')


def build_mmseg_dataset(dataset: str, data_root: Optional[str]):
    """mmseg's dataset object for ``dataset``: its file list (split file, suffixes) and loading - image (BGR,
    OpenCV) and annotations (reduce_zero_label from the dataset); the resize is ours (``eval_image_tensor``).
    Every label file must exist (DatasetError lists the missing ones); a split file naming an image twice is
    de-duplicated with a warning (each image is counted once)."""
    from mmcv.transforms import LoadImageFromFile

    layout = LAYOUTS.get(dataset)
    root = resolve_data_root(dataset, data_root)
    pipeline = [LoadImageFromFile(), _exact_annotations_class()()]
    cls = _mmseg_dataset_class(layout.mmseg_class)
    kwargs = dict(data_root=root, data_prefix=dict(img_path=layout.img_dir, seg_map_path=layout.ann_dir),
                  img_suffix=layout.img_suffix, seg_map_suffix=layout.seg_map_suffix, pipeline=pipeline,
                  test_mode=True, serialize_data=False, reduce_zero_label=layout.reduce_zero_label)
    if layout.split:
        kwargs['ann_file'] = layout.split
    try:
        ds = cls(**kwargs)
    except (AssertionError, FileNotFoundError, OSError) as e:
        raise DatasetError(f'{dataset}: mmseg could not read {root!r} ({e or type(e).__name__}). Expected layout:\n'
                           + layout.describe(root)) from None
    if len(ds) == 0:
        raise DatasetError(f'{dataset}: no images found under {root!r}. Expected layout:\n' + layout.describe(root))
    _drop_duplicates(dataset, ds, layout)
    _check_pairs(dataset, ds)
    return ds


_EXACT_ANNOTATIONS_CLS = None


def _exact_annotations_class():
    """mmseg's LoadAnnotations reading label maps exactly (``common.images.read_label_map``): mmseg casts them to 8
    bits, so a 16-bit label 260 would silently count as class 4. reduce_zero_label and label_map as mmseg does."""
    global _EXACT_ANNOTATIONS_CLS
    if _EXACT_ANNOTATIONS_CLS is None:
        from mmseg.datasets.transforms import LoadAnnotations

        class LoadExactAnnotations(LoadAnnotations):
            def _load_seg_map(self, results: dict) -> None:
                try:
                    gt = read_label_map(results['seg_map_path'])
                except ImageReadError as e:
                    raise DatasetError(f'cannot read {e}') from None
                if self.reduce_zero_label is None:
                    self.reduce_zero_label = results['reduce_zero_label']
                if self.reduce_zero_label:     # 0 (unlabelled) -> 255 (ignore), every id one lower, 255 stays 255
                    gt = np.where(gt == 0, 255, np.where(gt == 255, 255, gt - 1))
                if results.get('label_map') is not None:
                    old = gt.copy()
                    for old_id, new_id in results['label_map'].items():
                        gt[old == old_id] = new_id
                results['gt_seg_map'] = gt
                results['seg_fields'].append('gt_seg_map')

        _EXACT_ANNOTATIONS_CLS = LoadExactAnnotations
    return _EXACT_ANNOTATIONS_CLS


def _drop_duplicates(dataset: str, ds, layout: DatasetLayout) -> None:
    seen, unique = set(), []
    for info in ds.data_list:
        if info['img_path'] not in seen:
            seen.add(info['img_path'])
            unique.append(info)
    if len(unique) < len(ds.data_list):
        dup = len(ds.data_list) - len(unique)
        logger.warning('%s: %s lists %d image(s) more than once; each is evaluated once (%d images)', dataset,
                       layout.split or layout.img_dir, dup, len(unique))
        ds.data_list = unique


def _check_pairs(dataset: str, ds) -> None:
    missing_img, missing_gt = [], []
    for i in range(len(ds)):
        info = ds.get_data_info(i)
        if not osp.isfile(info['img_path']):
            missing_img.append(info['img_path'])
        if not osp.isfile(info['seg_map_path']):
            missing_gt.append(info['seg_map_path'])
    for what, missing in (('images', missing_img), ('label files', missing_gt)):
        if missing:
            shown = '\n  '.join(missing[:5]) + ('\n  ...' if len(missing) > 5 else '')
            raise DatasetError(f'{dataset}: {len(missing)} of {len(ds)} {what} are missing, e.g.\n  {shown}')


class ZeroShotSegDataset(torch.utils.data.Dataset):
    """One evaluation split: images resized and normalised for the model, labels at their original size."""

    def __init__(self, dataset: str, data_root: Optional[str] = None, resolution: int = 224, max_long: int = 2048,
                 indices: Optional[Sequence[int]] = None, max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        self.name = dataset
        self.mmseg_dataset = build_mmseg_dataset(dataset, data_root)
        self.data_root = self.mmseg_dataset.data_root
        self.indices = list(range(len(self.mmseg_dataset))) if indices is None else list(indices)
        self.resolution, self.max_long, self.max_image_pixels = resolution, max_long, max_image_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, indices: Sequence[int]) -> 'ZeroShotSegDataset':
        """A view over some samples (e.g. this rank's share), sharing the file list."""
        view = object.__new__(ZeroShotSegDataset)
        view.__dict__.update(self.__dict__)
        view.indices = [self.indices[i] for i in indices]
        return view

    def img_path(self, i: int) -> str:
        return self.mmseg_dataset.get_data_info(self.indices[i])['img_path']

    def check_files(self, i: int) -> None:
        """Headers only, before anything is decoded: the pixel limit for image and label map, and a label map
        that holds one class id per pixel."""
        info = self.mmseg_dataset.get_data_info(self.indices[i])
        try:
            check_image_size(info['img_path'], self.max_image_pixels)
            _, mode = check_image_size(info['seg_map_path'], self.max_image_pixels)
        except ImageTooLargeError as e:
            raise DatasetError(str(e)) from None
        except ImageReadError as e:
            raise DatasetError(f'cannot read {e}') from None
        if mode not in LABEL_MODES:
            raise DatasetError(f"{info['seg_map_path']}: the label map is a {mode} image; labels must be single-"
                               'channel PNGs (palette or grey) whose pixel values are the class ids, not colours')

    def __getitem__(self, i: int) -> dict:
        idx = self.indices[i]
        path = self.img_path(i)
        self.check_files(i)
        try:
            results = self.mmseg_dataset[idx]
        except DatasetError:
            raise
        except Exception as e:  # a corrupt / truncated / non-image file: name it instead of a deep traceback
            raise DatasetError(f'cannot read {path} or its label file: {type(e).__name__}: {e}') from None
        gt = results['gt_seg_map']
        if tuple(gt.shape[:2]) != tuple(results['ori_shape']):
            raise DatasetError(f'{path}: label map {gt.shape[:2]} does not match the image {results["ori_shape"]}')
        img = eval_image_tensor(results['img'], self.resolution, self.max_long)      # [3, h, w] float32 RGB
        return dict(img=img, gt=torch.from_numpy(gt.astype(np.int64)), ori_shape=tuple(results['ori_shape']),
                    img_path=path, index=idx)


def collate_list(batch: List[dict]) -> List[dict]:
    """Images differ in size: keep the samples as a list."""
    return batch
