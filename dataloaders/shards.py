"""img2dataset webdataset shards: list them, count their samples, read them (design.md §6).

A shard is a tar of consecutive members ``<key>.<ext>`` (``key.jpg`` + ``key.json`` with ``caption`` and/or
``key.txt``); a *sample* is a run of consecutive members sharing a key (webdataset's rule: the key is the member path
up to the first dot of its file name). Position ``i`` of a shard is its ``i``-th sample in tar order, which is how
the streaming loader addresses samples (``iter_tar_samples(path, start, stop)``) and how ``count_tar_samples``
counts them, so both always agree.
"""
import glob
import json
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from dataloaders.stores import StoreError

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# The most one member of a sample may unpack to. img2dataset writes photos of a few hundred KB and captions of a
# few hundred bytes; a compressed shard (.tar.gz) could otherwise unpack one member to gigabytes (a "zip bomb").
MAX_MEMBER_BYTES = 64 << 20


def brace_expand(spec: str) -> List[str]:
    """Expand ``{a..b}`` ranges (zero padding kept) and ``{x,y}`` lists, as webdataset/img2dataset names shards."""
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
    return [x for o in opts for x in brace_expand(head + o + tail)]


def list_shards(spec) -> List[Path]:
    """Shard list from a folder (every *.tar, sorted), a glob, a brace range ``dir/{00000..00012}.tar``, or a list."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in list_shards(s)]
    spec = str(spec)
    if os.path.isdir(spec):
        shards = sorted(Path(spec).glob("*.tar"))
    else:
        shards = []
        for s in brace_expand(spec):
            shards += sorted(Path(p) for p in glob.glob(s)) if any(c in s for c in "*?[") else [Path(s)]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise StoreError(f"{len(missing)} shard(s) not found, e.g. {missing[0]}")
    if not shards:
        raise StoreError(f"no .tar shards found at {spec}")
    return shards


def _member_key_ext(member: tarfile.TarInfo) -> Optional[Tuple[str, str]]:
    """(sample key, lower-case extension) of a regular tar member, None for members that belong to no sample."""
    if not member.isfile():
        return None
    d, _, base = member.name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return None
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _samples(path, start: int = 0, stop: Optional[int] = None, read: bool = True) -> Iterator[Tuple[str, dict]]:
    """(key, {ext: bytes}) for samples ``start <= position < stop``; members before ``start`` are skipped unread.

    read=False yields empty dicts (counting). A truncated/corrupt tar ends the shard; the samples before are kept."""
    position, key, current = -1, None, {}
    try:
        # "r:*" (seekable): unread member data is seeked over, so skipping the start of a shard costs only headers
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                tar.members = []  # TarFile keeps every header it has read: drop them (flat memory)
                ke = _member_key_ext(member)
                if ke is None:
                    continue
                k, ext = ke
                if k != key:
                    if position >= start:
                        yield key, current
                    position, key, current = position + 1, k, {}
                    if stop is not None and position >= stop:
                        return
                if read and position >= start:
                    if member.size > MAX_MEMBER_BYTES:   # the tar header's size: nothing decompressed yet
                        logger.warning("shard %s: member %s unpacks to %d bytes, more than the %d a sample member may "
                                       "hold (a zip bomb?); not read, the sample goes without it", path, member.name,
                                       member.size, MAX_MEMBER_BYTES)
                        continue
                    current[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        logger.warning("shard %s is truncated or corrupt (%s); keeping the samples read before", path, e)
    if key is not None and position >= start:
        yield key, current


def iter_tar_samples(path, start: int = 0, stop: Optional[int] = None) -> Iterator[dict]:
    """Stream samples ``start..stop-1`` of one tar -> {"__key__": key, "<ext>": bytes, ...}, one in memory at a time."""
    for key, members in _samples(path, start, stop):
        yield {"__key__": key, **members}


def count_tar_samples(path) -> int:
    """Samples in one tar, by the positions ``iter_tar_samples`` uses (headers only: data is seeked over)."""
    return sum(1 for _ in _samples(path, read=False))


def shard_sample_counts(shards: List[Path]) -> List[int]:
    """Samples per shard: img2dataset's ``NNNNN_stats.json`` 'successes' when present, else counted in the tar.

    img2dataset writes exactly its successes into the tar; a wrong stats file would make the streaming loader read
    past a shard's end (the missing samples are then replaced and counted) or stop before it (never read)."""
    counts = []
    for shard in shards:
        stats = shard.with_name(shard.stem + "_stats.json")
        if stats.is_file():
            try:
                counts.append(int(json.loads(stats.read_text())["successes"]))
                continue
            except (ValueError, KeyError, TypeError, RecursionError):
                logger.warning("%s is not an img2dataset stats file; counting the samples of %s", stats, shard)
        counts.append(count_tar_samples(shard))
    return counts


def sample_caption(sample: dict) -> Optional[str]:
    """Caption of an img2dataset sample: ``json['caption']``, else the ``txt`` member; None when absent/empty."""
    cap = None
    if "json" in sample:
        try:
            cap = json.loads(sample["json"]).get("caption")
        except (ValueError, AttributeError, RecursionError):   # RecursionError: nested deeper than Python's stack
            cap = None
    if not (isinstance(cap, str) and cap.strip()) and "txt" in sample:
        cap = sample["txt"].decode("utf-8", errors="replace")
    return cap.strip() if isinstance(cap, str) and cap.strip() else None


def sample_image(sample: dict) -> Optional[bytes]:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None
