"""Preprocessing: raw COCO / CC3M (img2dataset shards) -> our LMDB store, and stores -> superpixel LMDBs.

All three builders stream: work goes to a process pool in bounded windows, results are written by this process in
input order and committed every few hundred samples, so memory does not grow with the dataset. They resume: a rerun
skips keys (and, for CC3M, whole shards) already written. Each returns a summary dict (also printed by the scripts).
"""
import itertools
import json
import logging
import multiprocessing as mp
import os
import resource
import tarfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from dataloaders import stores
from dataloaders.imageio import decode_rgb, encode_for_store
from dataloaders import superpixels as sp

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _proc_status_mb(field: str) -> Optional[float]:
    """A memory line of /proc/self/status (Linux) in MiB, None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    """Peak resident memory in MiB of this process (or its largest finished child).

    For this process, Linux's VmHWM (reset at exec) is used: ru_maxrss survives exec and would report the memory of
    whatever process launched the script."""
    hwm = _proc_status_mb("VmHWM") if who == resource.RUSAGE_SELF else None
    return hwm if hwm is not None else resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def private_rss_mb() -> float:
    """Current private (anonymous) resident memory in MiB: this process's own data, without file pages.

    LMDB reads its file through a shared mapping; pages it touches stay resident and count in RSS/VmHWM, growing
    with the store, but they are clean page cache that the kernel reclaims under pressure. RssAnon is the memory
    the process really holds."""
    return _proc_status_mb("RssAnon") or 0.0


class _PeakPrivate:
    """Max of private_rss_mb() over samples taken every ``every`` calls (reading /proc costs ~20 us)."""

    def __init__(self, every: int = 64):
        self.every, self.calls, self.peak = every, 0, private_rss_mb()

    def tick(self):
        self.calls += 1
        if self.calls % self.every == 0:
            self.peak = max(self.peak, private_rss_mb())


def _windowed_map(fn: Callable, items: Iterable, workers: int, window: int = 0) -> Iterator:
    """Ordered map of ``fn`` over ``items`` with at most ``window`` items in flight (bounded memory).

    ``Pool.imap`` would read the whole input iterator ahead (every image of CC3M in RAM); windows prevent that.
    workers=0 runs inline (debugging, tiny inputs).
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    window = window or workers * 32
    with mp.Pool(workers) as pool:
        it = iter(items)
        pending = None
        while True:  # two windows in flight: workers encode the next one while this process writes the last
            batch = list(itertools.islice(it, window))
            nxt = pool.map_async(fn, batch, chunksize=max(1, len(batch) // (workers * 4))) if batch else None
            if pending is not None:
                yield from pending.get()
            if nxt is None:
                break
            pending = nxt


def _encode_job(job):
    """(key, raw bytes or file path, captions) -> (key, jpeg bytes or None, captions, error string)."""
    key, src, captions = job
    try:
        data = Path(src).read_bytes() if isinstance(src, (str, Path)) else src
        out, _ = encode_for_store(data)
        return key, out, captions, None
    except Exception as e:
        return key, None, captions, f"{type(e).__name__}: {e}"


class _Counter(dict):
    def add(self, what: str, n: int = 1):
        self[what] = self.get(what, 0) + n


def _finish(summary: dict, t0: float, mem: _PeakPrivate, written_key: str = "written") -> dict:
    dt = time.time() - t0
    summary["peak_private_mb"] = round(max(mem.peak, private_rss_mb()), 1)
    summary["seconds"] = round(dt, 2)
    summary["images_per_s"] = round(summary.get(written_key, 0) / dt, 1) if dt > 0 else 0.0
    summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
    summary["peak_rss_worker_mb"] = round(peak_rss_mb(resource.RUSAGE_CHILDREN), 1)
    return summary


def _clean_captions(caps) -> List[str]:
    return [c.strip() for c in caps if isinstance(c, str) and c.strip()]


def build_coco_store(karpathy_json, image_root, output_dir, splits: Sequence[str] = ("train",), workers: int = 0,
                     max_samples: Optional[int] = None, progress: bool = True) -> dict:
    """Karpathy ``dataset_coco.json`` + COCO images -> store at ``output_dir`` (key = file name, all captions).

    Images are looked up at ``image_root/<filepath>/<filename>`` (Karpathy's filepath is train2014/val2014) and
    then ``image_root/<filename>``, so both the COCO root and the train2014 folder work as ``image_root``.
    """
    t0 = time.time()
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise stores.StoreError(f"COCO image folder {image_root} does not exist")
    with open(_require(karpathy_json)) as f:
        try:
            items = [it for it in json.load(f)["images"] if it["split"] in splits]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise stores.StoreError(f"{karpathy_json} is not a Karpathy caption file: {e!r}")
    writer = stores.StoreWriter(output_dir, "coco", {"splits": list(splits)})
    mem = _PeakPrivate()
    count = _Counter(written=0, already_done=0, missing_file=0, no_caption=0, failed=0)

    def jobs():
        for it in items:
            key = it["filename"]
            if writer.has(key):
                count.add("already_done")
                continue
            caps = _clean_captions(s.get("raw") for s in it.get("sentences", []))
            if not caps:
                count.add("no_caption")
                continue
            path = image_root / it.get("filepath", "") / key
            if not path.is_file():
                path = image_root / key
            if not path.is_file():
                count.add("missing_file")
                logger.warning("COCO image %s not found under %s", key, image_root)
                continue
            yield key, str(path), caps

    try:
        for key, data, caps, err in tqdm(_windowed_map(_encode_job, jobs(), workers), total=len(items),
                                         disable=not progress, desc="coco", unit="img"):
            if data is None:
                count.add("failed")
                logger.warning("COCO image %s skipped: %s", key, err)
                continue
            writer.put(key, data, caps)
            count.add("written")
            mem.tick()
            if max_samples is not None and count["written"] >= max_samples:
                break
        total = writer.count()
    finally:
        writer.close()
    return _finish({"source": "coco", "output": str(output_dir), **count, "images_in_store": total}, t0, mem)


def _require(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise stores.StoreError(f"file {path} not found")
    return path


def _brace_expand(spec: str) -> List[str]:
    """Expand ``{a..b}`` ranges (zero padding kept) and ``{x,y}`` lists, as webdataset/img2dataset names shards."""
    import re
    m = re.search(r"\{([^{}]*)\}", spec)
    if not m:
        return [spec]
    body, head, tail = m.group(1), spec[:m.start()], spec[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.group(1), r.group(2)
        width = len(a) if a.startswith("0") else 0
        opts = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
    else:
        opts = body.split(",")
    return [x for o in opts for x in _brace_expand(head + o + tail)]


def list_shards(spec) -> List[Path]:
    """Shard list from a folder (every *.tar, sorted), a glob, a brace range ``dir/{00000..00012}.tar``, or a list."""
    import glob
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in list_shards(s)]
    spec = str(spec)
    if os.path.isdir(spec):
        shards = sorted(Path(spec).glob("*.tar"))
    else:
        shards = []
        for s in _brace_expand(spec):
            shards += sorted(Path(p) for p in glob.glob(s)) if any(c in s for c in "*?[") else [Path(s)]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise stores.StoreError(f"{len(missing)} shard(s) not found, e.g. {missing[0]}")
    if not shards:
        raise stores.StoreError(f"no .tar shards found at {spec}")
    return shards


def iter_tar_samples(path) -> Iterator[dict]:
    """Stream one webdataset tar -> {"__key__": key, "<ext>": bytes, ...} per sample, one sample in memory at a time.

    The key is the member path up to the first dot of its file name (webdataset's rule); members of a sample are
    consecutive in img2dataset shards. A truncated/corrupt tar ends the shard (the samples read so far are kept).
    """
    current, key = {}, None
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                d, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                k = f"{d}/{stem}" if d else stem
                if k != key:
                    if current:
                        yield current
                    current, key = {"__key__": k}, k
                current[ext.lower()] = tar.extractfile(member).read()
                tar.members = []  # TarFile keeps every member header it has read: drop them (flat memory)
    except (tarfile.TarError, OSError, EOFError) as e:
        logger.warning("shard %s is truncated or corrupt (%s); keeping the samples read before", path, e)
    if current:
        yield current


def sample_caption(sample: dict) -> Optional[str]:
    """Caption of an img2dataset sample: ``json['caption']``, else the ``txt`` member; None when absent/empty."""
    cap = None
    if "json" in sample:
        try:
            cap = json.loads(sample["json"]).get("caption")
        except (ValueError, AttributeError):
            cap = None
    if not (isinstance(cap, str) and cap.strip()) and "txt" in sample:
        cap = sample["txt"].decode("utf-8", errors="replace")
    return cap.strip() if isinstance(cap, str) and cap.strip() else None


def sample_image(sample: dict) -> Optional[bytes]:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None


def build_cc3m_store(shards, output_dir, workers: int = 0, max_samples: Optional[int] = None,
                     progress: bool = True) -> dict:
    """img2dataset webdataset shards -> store at ``output_dir`` in one streaming pass (key = sample key)."""
    t0 = time.time()
    shard_paths = list_shards(shards)
    writer = stores.StoreWriter(output_dir, "cc3m")
    mem = _PeakPrivate()
    count = _Counter(written=0, already_done=0, shards_skipped=0, no_image=0, no_caption=0, failed=0)
    stop = False

    def jobs(path):
        for s in iter_tar_samples(path):
            key = s["__key__"].rpartition("/")[2]  # img2dataset keys are unique across shards
            if writer.has(key):
                count.add("already_done")
                continue
            img, cap = sample_image(s), sample_caption(s)
            if img is None:
                count.add("no_image")
                continue
            if cap is None:
                count.add("no_caption")
                continue
            yield key, img, [cap]

    bar = tqdm(disable=not progress, desc="cc3m", unit="img")
    try:
        for path in shard_paths:
            name = path.name
            if writer.is_done(name):
                count.add("shards_skipped")
                continue
            for key, data, caps, err in _windowed_map(_encode_job, jobs(path), workers):
                if data is None:
                    count.add("failed")
                    logger.warning("CC3M sample %s in %s skipped: %s", key, name, err)
                    continue
                writer.put(key, data, caps)
                count.add("written")
                mem.tick()
                bar.update(1)
                if max_samples is not None and count["written"] >= max_samples:
                    stop = True
                    break
            if stop:
                break
            writer.mark_done(name)
            writer.commit()
        total = writer.count()
    finally:
        bar.close()
        writer.close()
    return _finish({"source": "cc3m", "output": str(output_dir), "shards": len(shard_paths), **count,
                    "images_in_store": total}, t0, mem)


def _superpixel_job(job):
    key, data = job
    try:
        labels = sp.felzenszwalb(np.asarray(decode_rgb(data)))
        return key, sp.encode_label_map(labels), None
    except Exception as e:
        return key, None, f"{type(e).__name__}: {e}"


def build_superpixel_store(store_dir, output=None, workers: int = 0, max_samples: Optional[int] = None,
                           progress: bool = True) -> dict:
    """Felzenszwalb (scale 224, sigma 0.9, min_size 224) for every image of a store -> superpixel LMDB.

    Default output: ``STORE/superpixels_scale224_sigma9.0_min_size224.lmdb``, where the loaders look for it.
    """
    t0 = time.time()
    store_dir = Path(store_dir)
    stores.read_store_info(store_dir)  # clear error when it is not a store
    output = Path(output) if output else store_dir / sp.superpixel_store_name()
    writer = stores.LabelStoreWriter(output)
    images = stores.LazyLmdb(store_dir / stores.STORE_LMDB, db="images", max_dbs=3)
    env = stores.shared_read_env(store_dir / stores.STORE_LMDB)
    with env.begin() as txn:
        n_images = txn.stat(env.open_db(b"images", txn=txn, create=False))["entries"]
    count = _Counter(written=0, already_done=0, failed=0)
    mem = _PeakPrivate()

    def jobs():
        for key in images.keys():  # streamed in key order; images fetched one at a time
            if writer.has(key):
                count.add("already_done")
                continue
            yield key, images.get(key)

    try:
        for key, value, err in tqdm(_windowed_map(_superpixel_job, jobs(), workers), total=n_images,
                                    disable=not progress, desc="superpixels", unit="img"):
            if value is None:
                count.add("failed")
                logger.warning("superpixels for %s failed: %s", key, err)
                continue
            writer.put(key, value)
            count.add("written")
            mem.tick()
            if max_samples is not None and count["written"] >= max_samples:
                break
    finally:
        writer.close()
    return _finish({"source": str(store_dir), "output": str(output), **count, "images_in_store": n_images}, t0, mem)
