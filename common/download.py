"""Find model weights on disk, or fetch them once: the released SegCLIP checkpoint, OpenAI's CLIP ViT-B/16 and the
DINO / DINOv2 vision models of ProxyCLIP and CASS.

Downloads stream into a hidden temporary file next to the destination and are moved into place with an atomic
rename only after they are complete and verified, so an interrupted or corrupt download never leaves a file that
looks usable; temporaries of killed downloads are removed by the next one. Processes sharing a cache download a
file once (a lock file; the others wait). Where the network is unavailable the error says which URL to fetch and
where to put the file.

Cache directory: the ``cache_dir`` argument, else the ``SEGCLIP_CACHE`` environment variable, else ``checkpoints/``
in this repository. ``SEGCLIP_OFFLINE=1`` forbids downloads altogether (a clear error instead).
"""
import contextlib
import fcntl
import hashlib
import http.client
import os
import shlex
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Union

from tqdm import tqdm

from common.errors import MissingFileError, SegCLIPError, brief
from common.fileio import OutputError, atomic_open, remove_stale_temporaries
from common.state_keys import diff_keys

SEGCLIP_URL = "https://github.com/ArrowLuo/SegCLIP/releases/download/checkpoint_v0/segclip.bin"
SEGCLIP_FILENAME = "segclip.bin"
# OpenAI's URLs carry the file's SHA-256 as the second-to-last path segment; it is checked after download.
# OpenAI's ViT CLIPs (the URL's folder is the file's SHA-256, checked after every download)
CLIP_URLS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
                "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/"
                "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/"
                "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/"
                      "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
# The second vision models of ProxyCLIP / CASS (design.md §14): the files their torch.hub entries download, read
# here with torch.load(weights_only=True) and never through torch.hub (which runs the repository's code). No
# checksums are published for them: a download is checked by its keys and shapes (``verify``, from the caller).
_DINO = "https://dl.fbaipublicfiles.com/dino"
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"
VFM_URLS = {
    "dino_vits8": f"{_DINO}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    "dino_vits16": f"{_DINO}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "dino_vitb8": f"{_DINO}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
    "dino_vitb16": f"{_DINO}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    "dinov2_vits14": f"{_DINOV2}/dinov2_vits14/dinov2_vits14_pretrain.pth",
    "dinov2_vits14_reg": f"{_DINOV2}/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
    "dinov2_vitb14": f"{_DINOV2}/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
    "dinov2_vitb14_reg": f"{_DINOV2}/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
    "dinov2_vitl14": f"{_DINOV2}/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
    "dinov2_vitl14_reg": f"{_DINOV2}/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth",
    "dinov2_vitg14": f"{_DINOV2}/dinov2_vitg14/dinov2_vitg14_pretrain.pth",
    "dinov2_vitg14_reg": f"{_DINOV2}/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth",
}
CACHE_ENV = "SEGCLIP_CACHE"
OFFLINE_ENV = "SEGCLIP_OFFLINE"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[1] / "checkpoints"
# The 2022 README told users to put OpenAI's ViT-B-16.pt into modules/; a file there is used before downloading.
LEGACY_CLIP_DIR = Path(__file__).resolve().parents[1] / "modules"

PathLike = Union[str, os.PathLike]
ExpectedKeys = Union[set, Callable[[], set]]


# What runs offline when a download cannot happen: the quickstart's checkpoint (a SegCLIP, and the CLIP inside it).
QUICKSTART_CHECKPOINT = "output/quickstart/train/pytorch_model.bin.1"
QUICKSTART_MAKES_IT = "python demo/quickstart.py trains it offline, in minutes on a CPU"


class DownloadError(SegCLIPError, RuntimeError):
    """A download failed or was refused; the message says what to fetch by hand and where to put it."""


def default_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else DEFAULT_CACHE_DIR


def manual_command(url: str, dest: PathLike) -> str:
    dest = Path(dest)
    return f"mkdir -p {shlex.quote(str(dest.parent))} && curl -L -o {shlex.quote(str(dest))} {shlex.quote(url)}"


def sha256_from_url(url: str) -> str:
    """OpenAI CLIP URLs: .../<sha256>/<name>.pt -> '<sha256>'."""
    parts = urllib.parse.urlparse(url).path.rstrip("/").split("/")
    sha = parts[-2] if len(parts) >= 2 else ""
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower()):
        raise ValueError(f"no SHA-256 path segment in {url}")
    return sha.lower()


def download_file(url: str, dest: PathLike, sha256: Optional[str] = None,
                  verify: Optional[Callable[[Path], None]] = None, timeout: float = 30.0,
                  progress: bool = True) -> Path:
    """Stream ``url`` into ``dest`` (a temporary file in dest's folder, then an atomic rename).

    sha256: expected hex digest, checked on the streamed bytes. verify: called on the complete temporary file,
    raises to reject it. On any failure nothing is left at ``dest`` or in its folder and DownloadError is raised.
    Processes sharing the cache (the ranks of a ``torchrun`` job) download once: one holds a lock on the
    destination while it downloads, the others wait and then find the file. Temporaries of killed downloads are
    removed first.
    """
    dest = Path(dest)
    how = f"download it by hand with: {manual_command(url, dest)}"
    if os.environ.get(OFFLINE_ENV, "").strip() not in ("", "0"):
        raise DownloadError(f"{dest} is missing and downloads are disabled ({OFFLINE_ENV} is set); {how}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the cache folder {dest.parent} ({e.strerror or e}); set {CACHE_ENV} "
                            f"or --cache_dir to a writable folder, or {how}") from None
    with _exclusive(dest, how):
        remove_stale_temporaries(dest.parent)
        if dest.is_file():                      # another process finished it while this one waited
            return dest
        print(f"downloading {url} -> {dest}", flush=True)
        try:
            with atomic_open(dest, "wb") as f:
                digest = _stream(url, f, timeout, progress, dest.name, how)
                if sha256 is not None and digest != sha256.lower():
                    raise DownloadError(f"checksum mismatch for {url}: expected SHA-256 {sha256}, got {digest}; "
                                        f"the file was removed; {how}")
                if verify is not None:
                    f.flush()
                    try:
                        verify(Path(f.name))
                    except Exception as e:  # noqa: BLE001 - any reason to reject the file is reported the same way
                        raise DownloadError(f"the file downloaded from {url} is not valid ({e}); it was removed; "
                                            f"{how}") from None
        except OutputError as e:               # the cache is read-only or full
            raise DownloadError(f"{e}; set {CACHE_ENV} or --cache_dir to a writable folder, or {how}") from None
    return dest


def _stream(url: str, f, timeout: float, progress: bool, desc: str, how: str) -> str:
    """Write ``url``'s body to ``f``; returns its SHA-256 hex digest. Network failures -> DownloadError."""
    digest = hashlib.sha256()
    received, total = 0, None
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "segclip-download"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                      desc=desc) as bar:
                while True:
                    try:
                        chunk = response.read(1 << 20)
                    except (OSError, http.client.HTTPException) as e:
                        raise _NetworkError(e) from None
                    if not chunk:
                        break
                    f.write(chunk)        # an OSError here is the disk's: atomic_open reports it as OutputError
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (_NetworkError, urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
            ValueError) as e:
        # URLError/HTTPError: offline, refused, 404; HTTPException: IncompleteRead when the server hangs up mid-body
        e = e.error if isinstance(e, _NetworkError) else e
        reason = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise DownloadError(f"could not download {url}: {type(e).__name__}: {reason}; {how}") from None
    if total is not None and received != total:
        # A server that drops the connection mid-body may end the stream without an exception.
        raise DownloadError(f"download of {url} was cut off after {received} of {total} bytes; {how}")
    if received == 0:
        raise DownloadError(f"download of {url} returned no data; {how}")
    return digest.hexdigest()


class _NetworkError(Exception):
    """Carries an exception of the response stream past atomic_open, which would take an OSError for the disk's."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def _exclusive(dest: Path, how: str) -> Iterator[None]:
    """Hold an exclusive lock on ``.<dest name>.lock`` in dest's folder; wait (saying so) while another process
    holds it. The lock file is removed on release; a waiter that locked a file already removed tries again."""
    lock_path = dest.with_name(f".{dest.name}.lock")
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DownloadError(f"cannot write into the cache folder {dest.parent} ({e.strerror or e}); set "
                                f"{CACHE_ENV} or --cache_dir to a writable folder, or {how}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process downloading {dest}", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# Verifying a downloaded checkpoint: loadable weights-only, and (when the caller says which) exactly the expected keys.
# The key set comes from the caller (``modules.checkpoint.segclip_checkpoint_keys``): this client knows no model.

def check_segclip_keys(state_dict: Dict, expected: set) -> None:
    """Raise ValueError naming the missing / unexpected keys unless the key set is exactly ``expected``."""
    diff = diff_keys(expected, set(state_dict))
    if diff:
        raise ValueError(f"expected the {len(expected)} keys of the released SegCLIP checkpoint, found "
                         f"{len(state_dict)}: {diff.describe(limit=3)}")


def _verify_segclip_file(path: Path, expected_keys: Optional[ExpectedKeys]) -> None:
    import torch  # the download client itself needs no torch; only this check of a fetched file does
    # mmap: a 750 MB checkpoint is checked without being read into memory (zip-format files; files written by
    # torch < 1.6 cannot be mapped and are read whole).
    try:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"not a loadable state dict: {brief(e)}") from None
    if not isinstance(state_dict, dict):
        raise ValueError(f"holds a {type(state_dict).__name__}, not a state dict")
    if expected_keys is not None:
        check_segclip_keys(state_dict, expected_keys() if callable(expected_keys) else expected_keys)


def resolve_segclip_checkpoint(path: Optional[PathLike] = None, cache_dir: Optional[PathLike] = None,
                               url: str = SEGCLIP_URL, progress: bool = True,
                               expected_keys: Optional[ExpectedKeys] = None) -> Path:
    """The SegCLIP checkpoint to load.

    path given: it must exist (a typo must not trigger a 750 MB download). path None: ``<cache>/segclip.bin``,
    downloaded from ``url`` when missing and checked: loadable with weights_only, and holding exactly
    ``expected_keys`` (a set, or a function returning one, called only when a download happens) when given.
    """
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise MissingFileError(f"checkpoint not found: {path} (leave the checkpoint option out to use the "
                                    f"released one, downloaded into {default_cache_dir(cache_dir)} when missing)")
        return path
    dest = default_cache_dir(cache_dir) / SEGCLIP_FILENAME
    if dest.is_file():
        return dest
    print(f"SegCLIP checkpoint not found at {dest}", flush=True)
    try:
        return download_file(url, dest, verify=lambda p: _verify_segclip_file(p, expected_keys), progress=progress)
    except DownloadError as e:       # what works without the download (every caller segments with SegCLIP)
        raise DownloadError(f"{e}; or use a SegCLIP checkpoint you have: --init_model PATH, e.g. "
                            f"--init_model {QUICKSTART_CHECKPOINT} ({QUICKSTART_MAKES_IT})") from None


def resolve_clip_weights(name_or_path: PathLike, cache_dir: Optional[PathLike] = None,
                         url: Optional[str] = None, progress: bool = True) -> Path:
    """OpenAI CLIP weights: a model name ('ViT-B/16') -> cached file, else ``modules/ViT-B-16.pt`` (the 2022
    location), else downloaded into the cache and SHA-256 checked; an existing path -> returned as is."""
    name = str(name_or_path)
    if name in CLIP_URLS or url is not None:
        url = url or CLIP_URLS[name]
        dest = default_cache_dir(cache_dir) / Path(urllib.parse.urlparse(url).path).name
        if dest.is_file():
            return dest
        legacy = LEGACY_CLIP_DIR / dest.name
        if name in CLIP_URLS and url == CLIP_URLS[name] and legacy.is_file():
            return legacy
        print(f"CLIP weights {name} not found at {dest}", flush=True)
        return download_file(url, dest, sha256=sha256_from_url(url), progress=progress)
    path = Path(name).expanduser()
    if path.is_file():
        return path
    raise MissingFileError(f"CLIP weights not found: {name!r} is neither a file nor one of the known models "
                            f"{sorted(CLIP_URLS)}")


def resolve_vfm_weights(name_or_path: PathLike, cache_dir: Optional[PathLike] = None, url: Optional[str] = None,
                        verify: Optional[Callable[[Path], None]] = None, progress: bool = True) -> Path:
    """DINO / DINOv2 weights (``--vfm``): a name of ``VFM_URLS`` -> ``<cache>/<the official file name>``, downloaded
    when missing and checked by ``verify`` (raises to reject the file); an existing path -> returned as is."""
    name = str(name_or_path)
    if name in VFM_URLS or url is not None:
        url = url or VFM_URLS[name]
        dest = default_cache_dir(cache_dir) / Path(urllib.parse.urlparse(url).path).name
        if dest.is_file():
            return dest
        print(f"vision model {name} not found at {dest}", flush=True)
        return download_file(url, dest, verify=verify, progress=progress)
    path = Path(name).expanduser()
    if path.is_file():
        return path
    raise MissingFileError(f"vision model weights not found: {name!r} is neither a file nor one of the known models "
                           f"{', '.join(VFM_URLS)}")
