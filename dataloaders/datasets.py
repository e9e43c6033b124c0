"""Map-style pretraining datasets over LMDB stores (ours and the 2022 layouts), design.md §6.

Every dataset yields ``dict(input_ids=LongTensor[max_words], attention_mask=LongTensor[max_words],
image=FloatTensor[3, S, S], superpixels=LongTensor[S/p, S/p], skipped=int)`` (S = image_size, p = the model's patch
size; superpixels only with ``use_seglabel``).

``skipped`` is how corrupt data is counted across loader workers and ranks: it is 1 when the requested sample could
not be used (undecodable or missing image) and the item is a replacement, else 0. The DataLoader collates it into a
LongTensor[B], so the sum of ``batch["skipped"]`` over an epoch's batches is the number of unusable samples this
rank met in that epoch (sum it before moving the batch to the GPU; add the ranks up with one all-reduce). The
replacement is a random sample drawn from the item's own RNG (seeded per (seed, epoch, index) by the training
loop), so it differs from epoch to epoch instead of doubling the same neighbour every time; after
``max_retries`` unusable draws in a row the store is declared damaged.
"""
import json
import logging
import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dataloaders import stores
from dataloaders.imageio import decode_rgb
from dataloaders.transforms import TrainTransform
from dataloaders import superpixels as sp
from modules.tokenization_clip import tokenize_captions

logger = logging.getLogger(__name__)


def _pack_keys(keys: Sequence[str]) -> np.ndarray:
    # Fixed-width bytes, not a list of str: no per-object refcounts, so forked workers share the pages (CC3M: 3M keys).
    return np.array([k.encode("utf-8") for k in keys], dtype=np.bytes_) if len(keys) else np.array([], dtype="S1")


class SuperpixelSource:
    """Superpixel label maps by image key, from an LMDB (ours or 2022 format), with an on-the-fly fallback.

    missing='compute' (default): an image without an entry gets its superpixels computed from the stored image
    (same parameters, identical result, ~50 ms) and is counted; missing='error': ``require(keys)`` refuses a store
    that lacks any of the dataset's images before training starts.
    """

    def __init__(self, path, missing: str = "compute"):
        if missing not in ("compute", "error"):
            raise ValueError(f"superpixel_missing must be 'compute' or 'error', got {missing!r}")
        self.path, self.missing = Path(path), missing
        if not (self.path / "data.mdb").is_file():
            raise stores.StoreError(f"superpixel store {self.path} not found; build it with "
                                    "`python preprocess/build_superpixels.py --store STORE` or drop --use_seglabel")
        self.lmdb = stores.LazyLmdb(self.path)
        self.computed = 0

    def labels(self, key: str, image) -> np.ndarray:
        """-> [h, w] int64 labels of the stored image ``image`` (PIL RGB) named ``key``."""
        value = self.lmdb.get(key)
        if value is not None:
            return sp.decode_label_map(value)
        if self.missing == "error":
            raise stores.StoreError(f"no superpixel entry for image '{key}' in {self.path}; finish the store with "
                                    "preprocess/build_superpixels.py (it resumes) or use --superpixel_missing compute")
        self.computed += 1
        if self.computed <= 10 or self.computed % 1000 == 0:
            logger.warning("superpixels of '%s' missing in %s; computed on the fly (%d so far in this worker)",
                           key, self.path, self.computed)
        return sp.felzenszwalb(np.asarray(image)).astype(np.int64)

    def require(self, keys: np.ndarray) -> None:
        """StoreError (one line) unless every key (utf-8 bytes) has an entry: --superpixel_missing error."""
        missing, first = self.lmdb.count_missing(keys)
        if missing:
            raise stores.StoreError(
                f"superpixel store {self.path} lacks {missing} of {len(keys)} images (e.g. '{first}'); finish it with "
                "`python preprocess/build_superpixels.py --store STORE` (it resumes) or use "
                "--superpixel_missing compute")


class CaptionImageDataset(Dataset):
    """Base class: sample i = (image key, caption number). Subclasses say where bytes and captions come from.

    patch_size: the model's (``SegCLIP.patch_size``): superpixel labels are pooled on its grid."""

    name = "data"

    def __init__(self, keys: Sequence[str], captions_per_key: Sequence[int], *, patch_size: int, max_words: int = 32,
                 use_seglabel: bool = False, superpixels: Optional[SuperpixelSource] = None, image_size: int = 224,
                 superpixel_reduce: str = "mean", max_retries: int = 10):
        counts = np.asarray(captions_per_key, dtype=np.int64)
        self.keys = _pack_keys(keys)
        # one sample per caption (COCO) or per image (CC3M): index arrays, not Python tuples (see _pack_keys)
        self.sample_key = np.repeat(np.arange(len(counts), dtype=np.int64), counts).astype(np.int32)
        self.sample_cap = (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)).astype(np.int16)
        self.max_words, self.use_seglabel = max_words, use_seglabel
        if use_seglabel and superpixels is None:
            raise ValueError(f"{self.name}: use_seglabel needs a superpixel store")
        self.superpixels = superpixels
        if use_seglabel and superpixels.missing == "error":
            superpixels.require(self.keys)
        self.image_size, self.patch_size, self.reduce = image_size, patch_size, superpixel_reduce
        self.max_retries = max_retries
        self.transform = TrainTransform(image_size)
        self.skipped = 0  # unusable images met by this process (log lines only; count epochs with item["skipped"])

    def __len__(self) -> int:
        return len(self.sample_key)

    def key(self, index: int) -> str:
        return self.keys[self.sample_key[index]].decode("utf-8")

    # --- to implement ---
    def image_bytes(self, key: str) -> Optional[bytes]:
        raise NotImplementedError

    def caption(self, key: str, cap_idx: int) -> str:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        n, i = len(self), index
        for attempt in range(self.max_retries + 1):
            if attempt:  # a random replacement (this item's RNG), not the neighbour: no fixed duplicate every epoch
                i = random.randrange(n)
            key = self.key(i)
            try:
                data = self.image_bytes(key)
                if data is None:
                    raise KeyError("image missing from the store")
                img = decode_rgb(data)
            except Exception as e:  # corrupt/missing image: replaced and counted, never the end of the run
                self.skipped += 1
                logger.warning("%s: image '%s' unusable (%s: %s); replaced by a random sample (%d in this worker)",
                               self.name, key, type(e).__name__, e, self.skipped)
                continue
            image, box = self.transform(img)
            ids, mask = tokenize_captions([self.caption(key, int(self.sample_cap[i]))], max_words=self.max_words)
            item = {"input_ids": ids[0], "attention_mask": mask[0], "image": image, "skipped": int(attempt > 0)}
            if self.use_seglabel:
                labels = self.superpixels.labels(key, img)
                if labels.shape != (img.height, img.width):  # superpixels of another store: the crop would be wrong
                    raise ValueError(f"{self.name}: superpixel map of '{key}' is {labels.shape[1]}x{labels.shape[0]}"
                                     f" but the stored image is {img.width}x{img.height}; the superpixel store "
                                     f"{self.superpixels.path} belongs to other images")
                item["superpixels"] = torch.from_numpy(
                    sp.patch_labels(labels, box, self.image_size, self.patch_size, self.reduce))
            return item
        raise stores.StoreError(f"{self.name}: sample {index} and {self.max_retries} random replacements are all "
                                "unreadable; the store looks damaged (rerun preprocessing)")


class StoreDataset(CaptionImageDataset):
    """A store written by preprocess/ (COCO or CC3M): one sample per caption, images and captions from LMDB."""

    def __init__(self, root, superpixel_path=None, superpixel_missing: str = "compute", **kw):
        root = Path(root)
        info = stores.read_store_info(root)
        self.root, self.info, self.name = root, info, info.get("source", "store")
        keys, counts = stores.read_caption_index(root, one_caption_each=info.get("source") == "cc3m")
        if not keys:
            raise stores.StoreError(f"store {root} holds no samples; did preprocessing finish?")
        spx = None
        if kw.get("use_seglabel"):
            spx = SuperpixelSource(superpixel_path or root / sp.superpixel_store_name(), superpixel_missing)
        super().__init__(keys, counts, superpixels=spx, **kw)
        self.images = stores.LazyLmdb(root / stores.STORE_LMDB, db="images", max_dbs=3)
        self.captions = stores.LazyLmdb(root / stores.STORE_LMDB, db="captions", max_dbs=3)

    def image_bytes(self, key):
        return self.images.get(key)

    def caption(self, key, cap_idx):
        return json.loads(self.captions.get(key))[cap_idx]


class LegacyCC3MDataset(CaptionImageDataset):
    """2022 CC3M layout in ``root``: image LMDB + keys pickle + captions pickle (+ superpixel LMDB)."""

    name = "cc3m(2022)"
    LMDB = "cc3m_train_lmdb_total"

    def __init__(self, root, allow_pickle: bool = False, superpixel_path=None, superpixel_missing="compute", **kw):
        root = Path(root)
        if not root.exists():
            raise stores.StoreError(f"CC3M data folder {root} does not exist")
        keys = list(stores.load_legacy_pickle(root / f"{self.LMDB}_keys.pkl", allow_pickle)["key"])
        desc = stores.load_legacy_pickle(root / "cc3m_train_desc.pkl", allow_pickle)
        self.desc = {k: str(v["caption"]) if isinstance(v, dict) else str(v) for k, v in desc.items()}
        missing = [k for k in keys if k not in self.desc]
        if missing:
            logger.warning("%s: %d images have no caption and are left out (e.g. '%s')", self.name, len(missing),
                           missing[0])
            keys = [k for k in keys if k in self.desc]
        spx = None
        if kw.get("use_seglabel"):
            spx = SuperpixelSource(superpixel_path or root / sp.superpixel_store_name(f"{self.LMDB}_seg"),
                                   superpixel_missing)
        super().__init__(keys, [1] * len(keys), superpixels=spx, **kw)
        self.images = stores.LazyLmdb(root / self.LMDB)
        stores.shared_read_env(root / self.LMDB)  # fail here with a clear message, not later inside a worker

    def image_bytes(self, key):
        return self.images.get(key)

    def caption(self, key, cap_idx):
        return self.desc[key]


class LegacyCOCODataset(CaptionImageDataset):
    """2022 COCO layout in ``root``: ``coco_train2014.pkl`` + Karpathy json (+ superpixel LMDB)."""

    name = "coco(2022)"

    def __init__(self, root, karpathy_json=None, splits=("train",), allow_pickle: bool = False, superpixel_path=None,
                 superpixel_missing="compute", **kw):
        root = Path(root)
        if not root.exists():
            raise stores.StoreError(f"COCO data folder {root} does not exist")
        karpathy_json = Path(karpathy_json) if karpathy_json else _find_karpathy(root)
        caps = stores.read_karpathy_captions(karpathy_json, splits)
        self.img_data = stores.load_legacy_pickle(root / "coco_train2014.pkl", allow_pickle)
        keys = [k for k in caps if k in self.img_data and caps[k]]
        self.caps = {k: caps[k] for k in keys}
        spx = None
        if kw.get("use_seglabel"):
            spx = SuperpixelSource(superpixel_path or root / sp.superpixel_store_name("coco_train2014_seg"),
                                   superpixel_missing)
        super().__init__(keys, [len(self.caps[k]) for k in keys], superpixels=spx, **kw)

    def image_bytes(self, key):
        return self.img_data.get(key)

    def caption(self, key, cap_idx):
        return self.caps[key][cap_idx]


def _find_karpathy(root: Path) -> Path:
    for p in (root / "dataset_coco.json", root / "karpathy" / "dataset_coco.json"):
        if p.is_file():
            return p
    raise stores.StoreError(f"no dataset_coco.json in {root} or {root / 'karpathy'}; pass --karpathy_json")


def is_legacy_cc3m(root) -> bool:
    return (Path(root) / LegacyCC3MDataset.LMDB).is_dir()


def is_legacy_coco(root) -> bool:
    return (Path(root) / "coco_train2014.pkl").is_file()
