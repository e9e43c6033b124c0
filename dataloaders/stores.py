"""LMDB stores for pretraining data: the layout this project writes, and readers for the 2022 layouts.

Our store is one folder::

    STORE/store.lmdb            LMDB environment with three named databases, written in the same transactions:
        images    key (utf-8) -> encoded image bytes (JPEG, short side 224)
        captions  key (utf-8) -> utf-8 JSON list of captions (COCO ~5, CC3M 1)
        meta      b"info" -> utf-8 JSON {"format": "segclip-store", "version": 1, "source": ..., ...}
                  b"done/<fingerprint>" -> b"1" for every finished CC3M input shard (resume; see
                  build_stores.shard_fingerprint)
    STORE/superpixels_scale224_sigma9.0_min_size224.lmdb   key -> zlib(.npy) label map (dataloaders.superpixels)

Every value is plain bytes/JSON/NumPy: reading a store never unpickles anything. Images and captions of one sample
are committed in the same transaction, so an interrupted run leaves a consistent store that a rerun completes.

2022 layouts (read only; the pickles need ``allow_pickle=True`` and log a warning):
    CC3M: ``cc3m_train_lmdb_total/`` (LMDB key -> image bytes), ``cc3m_train_lmdb_total_keys.pkl`` ({"key": [...]}),
          ``cc3m_train_desc.pkl`` ({key: {"caption": str, ...}}),
          ``cc3m_train_lmdb_total_seg_scale224_sigma9.0_min_size224.lmdb`` (key -> zlib JSON [h, w, labels...]).
    COCO: ``coco_train2014.pkl`` ({file name: image bytes}), Karpathy ``dataset_coco.json``,
          ``coco_train2014_seg_scale224_sigma9.0_min_size224.lmdb``.
"""
import json
import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import lmdb

from common.errors import SegCLIPError

logger = logging.getLogger(__name__)

STORE_LMDB = "store.lmdb"
FORMAT_NAME = "segclip-store"
FORMAT_VERSION = 1
# LMDB reserves address space, not disk: a large map costs nothing until written (sparse file on Linux).
DEFAULT_MAP_SIZE = 1 << 40


class StoreError(SegCLIPError, ValueError):
    """A store is missing, malformed or of the wrong kind (message says how to fix it)."""


def open_env(path, readonly: bool = True, max_dbs: int = 0, map_size: int = DEFAULT_MAP_SIZE) -> lmdb.Environment:
    """Open an LMDB folder; a read-only open of a missing or non-LMDB path raises StoreError."""
    path = Path(path)
    if readonly:
        if not (path / "data.mdb").is_file():
            raise StoreError(f"no LMDB store at {path} (expected {path / 'data.mdb'}); "
                             "run the preprocessing scripts in preprocess/ first or fix the path")
        # lock=False: many DataLoader workers and ranks read concurrently and nobody writes during training.
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False, max_dbs=max_dbs,
                         max_readers=1024, subdir=True)
    path.mkdir(parents=True, exist_ok=True)
    return lmdb.open(str(path), map_size=map_size, max_dbs=max_dbs, subdir=True, readahead=False, meminit=False)


_READ_ENVS: Dict[str, lmdb.Environment] = {}
_READ_PID = None


def shared_read_env(path, max_dbs: int = 3) -> lmdb.Environment:
    """One read-only environment per path and process (LMDB refuses to open the same path twice in a process)."""
    global _READ_PID
    if _READ_PID != os.getpid():  # forked child: the parent's handles must not be used
        for env in _READ_ENVS.values():
            # Close the inherited copies (this process's mappings only): while a LazyLmdb still references one,
            # LMDB refuses to open the same path again ("already open in this process").
            env.close()
        _READ_ENVS.clear()
        _READ_PID = os.getpid()
    key = str(Path(path).resolve())
    if key not in _READ_ENVS:
        _READ_ENVS[key] = open_env(path, readonly=True, max_dbs=max_dbs)
    return _READ_ENVS[key]


def drop_shared_env(path):
    """Close this process's cached read environment of ``path`` (a writer is about to open it)."""
    env = _READ_ENVS.pop(str(Path(path).resolve()), None) if _READ_PID == os.getpid() else None
    if env is not None:
        env.close()


class LazyLmdb:
    """Read-only LMDB table opened on first use in each process.

    LMDB environments must not cross fork(): DataLoader workers and DDP ranks each open their own (the per-process
    cache above is reset in a forked child). Pickling drops the handle, so a Dataset holding one can be sent to
    workers (spawn or fork).
    """

    def __init__(self, path, db: Optional[str] = None, max_dbs: int = 3):
        self.path, self.db, self.max_dbs = str(path), db, max_dbs
        self._env = self._db = None

    def _table(self):
        env = shared_read_env(self.path, max_dbs=self.max_dbs)
        if env is not self._env:  # first use, new process, or the environment was reopened
            db = None
            if self.db is not None:
                try:
                    db = env.open_db(self.db.encode(), create=False)
                except lmdb.NotFoundError:
                    raise StoreError(f"{self.path} has no '{self.db}' table; is it a store written by preprocess/?")
            self._env, self._db = env, db
        return self._env, self._db

    def get(self, key: str) -> Optional[bytes]:
        env, db = self._table()
        with env.begin(db=db) as txn:
            return txn.get(key.encode("utf-8"))

    def count_missing(self, keys: Iterable[bytes]) -> Tuple[int, Optional[str]]:
        """(how many of ``keys`` have no entry, the first of them) in one read transaction."""
        env, db = self._table()
        missing, first = 0, None
        with env.begin(db=db) as txn:
            for k in keys:
                if txn.get(bytes(k)) is None:
                    missing += 1
                    first = first or bytes(k).decode("utf-8", errors="replace")
        return missing, first

    def keys(self) -> Iterator[str]:
        """Keys in LMDB (byte) order, streamed."""
        env, db = self._table()
        with env.begin(db=db) as txn:
            for k in txn.cursor().iternext(keys=True, values=False):
                yield bytes(k).decode("utf-8")

    def __getstate__(self):
        return {"path": self.path, "db": self.db, "max_dbs": self.max_dbs}

    def __setstate__(self, state):
        self.__init__(state["path"], state["db"], state["max_dbs"])


class StoreWriter:
    """Writer for our store: put (key, image bytes, captions) and commit every ``commit_every`` samples."""

    def __init__(self, root, source: str, info: Optional[dict] = None, commit_every: int = 500):
        self.root = Path(root)
        drop_shared_env(self.root / STORE_LMDB)
        self.env = open_env(self.root / STORE_LMDB, readonly=False, max_dbs=3)
        self.images = self.env.open_db(b"images")
        self.captions = self.env.open_db(b"captions")
        self.meta = self.env.open_db(b"meta")
        self.commit_every = commit_every
        with self.env.begin(db=self.meta, write=True) as txn:
            old = txn.get(b"info")
            if old is not None and json.loads(old).get("source") != source:
                raise StoreError(f"{self.root} already holds a '{json.loads(old).get('source')}' store; "
                                 f"refusing to add '{source}' data to it (use another --output_dir)")
            meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "source": source, **(info or {})}
            txn.put(b"info", json.dumps(meta).encode())
        self._txn = self.env.begin(write=True)
        self._pending = 0

    def has(self, key: str) -> bool:
        return self._txn.get(key.encode("utf-8"), db=self.captions) is not None

    def put(self, key: str, image_bytes: bytes, captions: List[str]):
        k = key.encode("utf-8")
        self._txn.put(k, image_bytes, db=self.images)
        self._txn.put(k, json.dumps(list(captions), ensure_ascii=False).encode("utf-8"), db=self.captions)
        self._pending += 1
        if self._pending >= self.commit_every:
            self.commit()

    def mark_done(self, name: str):
        self._txn.put(b"done/" + name.encode("utf-8"), b"1", db=self.meta)

    def is_done(self, name: str) -> bool:
        return self._txn.get(b"done/" + name.encode("utf-8"), db=self.meta) is not None

    def count(self) -> int:
        return self._txn.stat(self.captions)["entries"]

    def commit(self):
        self._txn.commit()
        self._txn = self.env.begin(write=True)
        self._pending = 0

    def close(self):
        if self._txn is not None:
            self._txn.commit()
            self._txn = None
        self.env.sync()
        self.env.close()


class LabelStoreWriter:
    """Writer for a superpixel LMDB (key -> encoded label map)."""

    def __init__(self, path, commit_every: int = 500):
        drop_shared_env(path)
        self.env = open_env(path, readonly=False)
        self.commit_every = commit_every
        self._txn = self.env.begin(write=True)
        self._pending = 0

    def has(self, key: str) -> bool:
        return self._txn.get(key.encode("utf-8")) is not None

    def put(self, key: str, value: bytes):
        self._txn.put(key.encode("utf-8"), value)
        self._pending += 1
        if self._pending >= self.commit_every:
            self._txn.commit()
            self._txn = self.env.begin(write=True)
            self._pending = 0

    def close(self):
        self._txn.commit()
        self.env.sync()
        self.env.close()


def is_store(root) -> bool:
    return (Path(root) / STORE_LMDB / "data.mdb").is_file()


def read_store_info(root) -> dict:
    """The ``meta/info`` record of our store; StoreError if ``root`` is not one."""
    root = Path(root)
    if not root.exists():
        raise StoreError(f"data store {root} does not exist; run preprocess/ first or fix the path")
    if not is_store(root):
        raise StoreError(f"{root} is not a store written by preprocess/ (no {STORE_LMDB}/); for 2022-format data "
                         "pass --data_format legacy --allow_pickle")
    env = shared_read_env(root / STORE_LMDB)
    try:
        with env.begin() as txn:
            meta_db = env.open_db(b"meta", txn=txn, create=False)
            info = txn.get(b"info", db=meta_db)
    except lmdb.NotFoundError:
        info = None
    if info is None:
        raise StoreError(f"{root / STORE_LMDB} has no meta/info record; it was not written by preprocess/")
    return json.loads(info)


def read_caption_index(root, one_caption_each: bool = False) -> Tuple[List[str], List[int]]:
    """Stream the captions table of a store -> (keys in LMDB order, number of captions per key).

    one_caption_each: skip parsing the values (CC3M stores hold exactly one caption per key; 3M keys load in
    seconds instead of a minute)."""
    env = shared_read_env(Path(root) / STORE_LMDB)
    keys, counts = [], []
    with env.begin() as txn:
        db = env.open_db(b"captions", txn=txn, create=False)
        if one_caption_each:
            keys = [bytes(k).decode("utf-8") for k in txn.cursor(db=db).iternext(keys=True, values=False)]
            return keys, [1] * len(keys)
        for k, v in txn.cursor(db=db):
            keys.append(bytes(k).decode("utf-8"))
            counts.append(len(json.loads(bytes(v))))
    return keys, counts


def load_legacy_pickle(path, allow_pickle: bool):
    """Unpickle a 2022 file, only when the user opted in (pickle can run arbitrary code)."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"2022-format file {path} not found")
    if not allow_pickle:
        raise StoreError(f"{path} is a pickle (2022 format); loading it can execute code. Pass --allow_pickle if you "
                         "trust it, or convert once with preprocess/ to the pickle-free store")
    warnings.warn(f"unpickling 2022-format file {path} (trusted by --allow_pickle)", stacklevel=2)
    logger.warning("unpickling 2022-format file %s (trusted by --allow_pickle)", path)
    with open(path, "rb") as f:
        return pickle.load(f)


def read_karpathy_captions(json_path, splits=("train",)) -> Dict[str, List[str]]:
    """Karpathy ``dataset_coco.json`` -> {file name: [raw captions]} for the chosen splits (file order).

    The 2022 training used split 'train' only (82,783 images, 414,113 captions); 'restval' can be added.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise StoreError(f"Karpathy caption file {json_path} not found (dataset_coco.json from "
                         "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip)")
    try:
        with open(json_path) as f:
            images = json.load(f)["images"]
        out = {}
        for item in images:
            if item["split"] in splits:
                out[item["filename"]] = [s["raw"] for s in item["sentences"]]
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:   # Recursion: nested too deep
        raise StoreError(f"{json_path} is not a Karpathy caption file (need images[].filename/split/sentences[].raw):"
                         f" {e!r}")
    return out
