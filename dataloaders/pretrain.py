"""Command-line entry to the pretraining data: ``add_data_args(parser)`` + ``build_pretrain_dataset(args)``.

``--datatype cc,coco`` concatenates the CC3M and COCO stores into one map-style Dataset (use it with a
DistributedSampler). ``--datatype wds`` streams img2dataset shards instead and returns an IterableDataset
(no sampler; call ``dataset.set_epoch(e)`` each epoch and ``dataset.set_batch_size(B)`` once, which returns the
exact batches per epoch; ``len(dataset)`` is samples per rank). The superpixel patch grid is the model's: pass
``patch_size=model.patch_size``.
The training script owns ``--max_words``, ``--use_seglabel``, ``--seed`` and ``--batch_size``.
"""
import argparse
import logging
from pathlib import Path
from typing import List

from torch.utils.data import ConcatDataset

from common.errors import SegCLIPError
from dataloaders import datasets as D
from dataloaders import stores
from dataloaders.webdataset_stream import WebDatasetStream

logger = logging.getLogger(__name__)

DATATYPES = ("cc", "coco", "wds")


class DataArgError(SegCLIPError, ValueError):
    """The data flags do not describe a usable pretraining set (message names the flag and the fix)."""


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("pretraining data (see docs/data.md)")
    g.add_argument("--datatype", default="cc,coco",
                   help="comma-separated sources, concatenated: 'cc' (CC3M store), 'coco' (COCO store), or 'wds' "
                        "alone (stream img2dataset shards, no preprocessing). Default: cc,coco")
    g.add_argument("--cc_store", default=None,
                   help="CC3M data folder: a store from preprocess/build_cc3m.py, or the 2022 folder holding "
                        "cc3m_train_lmdb_total/ (with --data_format legacy)")
    g.add_argument("--coco_store", default=None,
                   help="COCO data folder: a store from preprocess/build_coco.py, or the 2022 folder holding "
                        "coco_train2014.pkl (with --data_format legacy)")
    g.add_argument("--data_format", default="auto", choices=["auto", "store", "legacy"],
                   help="'store': folders written by preprocess/; 'legacy': the 2022 pickle/LMDB layout (needs "
                        "--allow_pickle); 'auto': detect per folder. Default: auto")
    g.add_argument("--allow_pickle", action="store_true",
                   help="allow unpickling the 2022 keys/captions/image pickles (only for files you trust)")
    g.add_argument("--karpathy_json", default=None,
                   help="legacy COCO only: dataset_coco.json (default: COCO_STORE/dataset_coco.json or "
                        "COCO_STORE/karpathy/dataset_coco.json)")
    g.add_argument("--coco_splits", default="train",
                   help="legacy COCO only: Karpathy splits to train on, comma-separated (the store fixes them at "
                        "preprocessing). Default: train (414,113 captions, as in 2022)")
    g.add_argument("--cc_superpixels", default=None,
                   help="superpixel LMDB for CC3M (default: inside --cc_store under its standard name)")
    g.add_argument("--coco_superpixels", default=None,
                   help="superpixel LMDB for COCO (default: inside --coco_store under its standard name)")
    g.add_argument("--superpixel_reduce", default="mean", choices=["mean", "majority"],
                   help="label of a patch: 'mean' of its superpixel ids truncated (2022 behaviour, default) "
                        "or 'majority' vote")
    g.add_argument("--superpixel_missing", default="compute", choices=["compute", "error"],
                   help="image without a stored superpixel map: 'compute' it on the fly (counted, logged) or "
                        "'error'. Default: compute")
    g.add_argument("--image_size", type=int, default=224,
                   help="side of the square training crop in pixels, a multiple of the model's patch size (16 for "
                        "ViT-B/16: superpixel patch labels then have image_size/16 rows). Build the CLIP with "
                        "image_resolution equal to it to avoid resizing the position embedding. Default: 224 (the "
                        "paper)")
    g.add_argument("--image_retries", type=int, default=10,
                   help="corrupt image in a store: try up to this many following samples before failing. Default: 10")
    g.add_argument("--wds_shards", default=None,
                   help="--datatype wds: shard folder, glob, or brace range like 'cc3m/{00000..00331}.tar'")
    g.add_argument("--wds_samples_per_epoch", type=int, default=None,
                   help="--datatype wds: samples per epoch over all ranks (default: from img2dataset *_stats.json, "
                        "else counted by reading the shards once)")
    return parser


def _datatypes(spec: str):
    names = [n.strip() for n in str(spec).split(",") if n.strip()]  # 2022 style trailing comma ("cc,coco,") is fine
    bad = [n for n in names if n not in DATATYPES]
    if bad or not names:
        raise DataArgError(f"--datatype {spec!r}: unknown source(s) {bad}; use a comma list of {DATATYPES}")
    if "wds" in names and len(names) > 1:
        raise DataArgError("--datatype wds streams shards and cannot be mixed with map-style stores; preprocess the "
                         "shards with preprocess/build_cc3m.py to combine them with coco")
    return names


def _legacy(args, root: Path, kind: str) -> bool:
    fmt = getattr(args, "data_format", "auto")
    if fmt == "store":
        return False
    if fmt == "legacy":
        return True
    if stores.is_store(root):
        return False
    if (D.is_legacy_cc3m(root) if kind == "cc" else D.is_legacy_coco(root)):
        return True
    return False  # let the store reader raise its clear error


def check_data_paths(args) -> List[str]:
    """The cheap checks of the data flags (sources named, their folders there), made before any model is built;
    -> the source names of ``--datatype``. ``build_pretrain_dataset`` opens them."""
    names = _datatypes(getattr(args, "datatype", "cc,coco"))
    if names == ["wds"]:
        if not getattr(args, "wds_shards", None):
            raise DataArgError("--datatype wds needs --wds_shards (a folder of img2dataset .tar shards or a pattern)")
        return names
    for name in names:
        root = getattr(args, f"{name}_store", None)
        if not root:
            raise DataArgError(f"--datatype includes '{name}' but --{name}_store is not set; point it at the folder "
                               f"written by preprocess/build_{'cc3m' if name == 'cc' else 'coco'}.py or drop '{name}'")
        if not Path(root).exists():
            raise DataArgError(f"--{name}_store {root} does not exist")
    return names


def build_pretrain_dataset(args, patch_size: int):
    """-> Dataset (map-style, possibly a ConcatDataset) or WebDatasetStream for ``--datatype wds``.

    patch_size: the model's (``SegCLIP.patch_size``); superpixel labels are pooled on its patch grid."""
    names = check_data_paths(args)
    common = dict(max_words=args.max_words, use_seglabel=bool(getattr(args, "use_seglabel", False)),
                  superpixel_reduce=getattr(args, "superpixel_reduce", "mean"),
                  image_size=int(getattr(args, "image_size", 224)), patch_size=int(patch_size))
    if common["image_size"] < patch_size or common["image_size"] % patch_size:
        raise DataArgError(f"--image_size {common['image_size']} must be a positive multiple of the model's patch "
                           f"size {patch_size}")
    if names == ["wds"]:
        return WebDatasetStream(args.wds_shards, samples_per_epoch=getattr(args, "wds_samples_per_epoch", None),
                                seed=getattr(args, "seed", 0), **common)
    common.update(max_retries=getattr(args, "image_retries", 10),
                  superpixel_missing=getattr(args, "superpixel_missing", "compute"))
    parts = []
    for name in names:
        root = Path(getattr(args, f"{name}_store"))
        spx = getattr(args, f"{name}_superpixels", None)
        if _legacy(args, root, name):
            allow = bool(getattr(args, "allow_pickle", False))
            if name == "cc":
                ds = D.LegacyCC3MDataset(root, allow_pickle=allow, superpixel_path=spx, **common)
            else:
                splits = tuple(s for s in getattr(args, "coco_splits", "train").split(",") if s)
                ds = D.LegacyCOCODataset(root, karpathy_json=getattr(args, "karpathy_json", None), splits=splits,
                                         allow_pickle=allow, superpixel_path=spx, **common)
        else:
            ds = D.StoreDataset(root, superpixel_path=spx, **common)
            expected = "cc3m" if name == "cc" else "coco"
            if ds.info.get("source") != expected:
                raise DataArgError(f"--{name}_store {root} holds '{ds.info.get('source')}' data, not {expected}")
        logger.info("pretraining source %s: %d samples from %s", ds.name, len(ds), root)
        parts.append(ds)
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)
