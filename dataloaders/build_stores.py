"""Preprocessing: raw COCO / CC3M (img2dataset shards) -> our LMDB store, and stores -> superpixel LMDBs.

All three builders stream: work goes to a process pool in bounded windows, results are written by this process in
input order and committed every few hundred samples, so memory does not grow with the dataset. They resume: a rerun
skips keys (and, for CC3M, whole shards) already written. Each returns a summary dict (also printed by the scripts).
"""
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import resource
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from dataloaders import stores
from dataloaders.imageio import decode_rgb, encode_for_store
from dataloaders.shards import iter_tar_samples, list_shards, sample_caption, sample_image
from dataloaders import superpixels as sp

logger = logging.getLogger(__name__)

# CC3M store keys are "<shard fingerprint>/<img2dataset key>" (img2dataset keys are unique only within one run);
# stores written before carry the bare keys and no "cc3m_keys" entry in their info.
CC3M_KEY_SCHEME = "shard-fingerprint/key"
# Bytes hashed at each end of a shard for its fingerprint (with its size): distinct shards differ there (JPEG data),
# and a moved or renamed copy keeps it, so finished shards are recognised wherever they lie.
FINGERPRINT_BYTES = 1 << 20


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
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:   # Recursion: nested too deep
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


def shard_fingerprint(path) -> str:
    """16 hex digits identifying a shard by content: sha256 of its size and its first and last MiB."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            h.update(f.read())
    return h.hexdigest()[:16]


def _check_cc3m_key_scheme(output_dir) -> None:
    """Refuse to extend a store whose keys follow another scheme (a rerun would store every sample twice)."""
    if not stores.is_store(output_dir):
        return
    info = stores.read_store_info(output_dir)
    if info.get("source") == "cc3m" and info.get("cc3m_keys") != CC3M_KEY_SCHEME:
        raise stores.StoreError(f"{output_dir} is a CC3M store written by an older version (keys without shard "
                                "fingerprints); write the new store to another --output_dir")


def build_cc3m_store(shards, output_dir, workers: int = 0, max_samples: Optional[int] = None,
                     progress: bool = True) -> dict:
    """img2dataset webdataset shards -> store at ``output_dir`` in one streaming pass.

    Shards are identified by content (``shard_fingerprint``), not by file name, and a sample's store key is
    ``<fingerprint>/<img2dataset key>``: two img2dataset runs both holding ``00000.tar`` (same names, same keys)
    are both stored whole, while the same shard given twice, or again after a move, is skipped. Every sample read
    is either written or counted (no_image, no_caption, failed, duplicate_key, already_done)."""
    t0 = time.time()
    shard_paths = list_shards(shards)
    _check_cc3m_key_scheme(output_dir)
    writer = stores.StoreWriter(output_dir, "cc3m", {"cc3m_keys": CC3M_KEY_SCHEME})
    mem = _PeakPrivate()
    count = _Counter(written=0, already_done=0, shards_skipped=0, no_image=0, no_caption=0, failed=0,
                     duplicate_key=0)
    stop = False

    def jobs(path, fingerprint):
        seen = set()  # keys of this shard in this run: a repeat is a duplicate inside the shard, not a resume
        for s in iter_tar_samples(path):
            key = f"{fingerprint}/{s['__key__']}"
            if key in seen:
                count.add("duplicate_key")
                logger.warning("CC3M sample key %s appears twice in %s; the second is not stored", s["__key__"], path)
                continue
            seen.add(key)
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
            fingerprint = shard_fingerprint(path)
            if writer.is_done(fingerprint):  # also a shard given twice in this run
                count.add("shards_skipped")
                logger.info("shard %s (%s) is already in the store; skipped", path, fingerprint)
                continue
            for key, data, caps, err in _windowed_map(_encode_job, jobs(path, fingerprint), workers):
                if data is None:
                    count.add("failed")
                    logger.warning("CC3M sample %s in %s skipped: %s", key, path, err)
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
            writer.mark_done(fingerprint)
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
