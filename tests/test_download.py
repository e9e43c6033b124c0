"""common/download.py against a real HTTP server on 127.0.0.1 started by the test."""
import hashlib
import http.server
import os
import socket
import threading

import pytest
import torch

from common import download
from common.download import DownloadError, check_segclip_keys, resolve_clip_weights, resolve_segclip_checkpoint
from modules.checkpoint import segclip_checkpoint_keys


class _Handler(http.server.BaseHTTPRequestHandler):
    routes = {}      # path -> (bytes, mode) ; mode 'ok' | 'drop' (send half the body, then hang up)
    requests = []

    def do_GET(self):  # noqa: N802 (http.server naming)
        type(self).requests.append(self.path)
        if self.path not in self.routes:
            self.send_error(404)
            return
        body, mode = self.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "drop":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        else:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    _Handler.routes, _Handler.requests = {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, _Handler
    httpd.shutdown()
    httpd.server_close()


def _free_port_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more: connection refused, like being offline
    return f"http://127.0.0.1:{port}"


def _payload(n=3 * 1024 * 1024 + 17):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()


def test_clip_download_success_and_cache(server, tmp_path, monkeypatch):
    base, handler = server
    body = _payload()
    sha = hashlib.sha256(body).hexdigest()
    handler.routes[f"/clip/models/{sha}/ViT-B-16.pt"] = (body, "ok")
    monkeypatch.setitem(download.CLIP_URLS, "ViT-B/16", f"{base}/clip/models/{sha}/ViT-B-16.pt")
    monkeypatch.setenv("SEGCLIP_CACHE", str(tmp_path / "cache"))
    path = resolve_clip_weights("ViT-B/16", progress=False)
    assert path == tmp_path / "cache" / "ViT-B-16.pt"
    assert path.read_bytes() == body
    assert os.listdir(path.parent) == ["ViT-B-16.pt"]  # no temporary file left
    # cached: a second call does not touch the network
    assert resolve_clip_weights("ViT-B/16", progress=False) == path
    assert len(handler.requests) == 1
    # an existing path is returned as is
    assert resolve_clip_weights(str(path)) == path


def test_clip_checksum_mismatch_removes_file(server, tmp_path):
    base, handler = server
    body = _payload(100_000)
    wrong = hashlib.sha256(b"something else").hexdigest()
    url = f"{base}/{wrong}/ViT-B-16.pt"
    handler.routes[f"/{wrong}/ViT-B-16.pt"] = (body, "ok")
    with pytest.raises(DownloadError, match="checksum mismatch") as err:
        resolve_clip_weights("ViT-B/16", cache_dir=tmp_path, url=url, progress=False)
    assert url in str(err.value) and "curl -L -o" in str(err.value)
    assert os.listdir(tmp_path) == []


def test_connection_dropped_halfway_leaves_nothing(server, tmp_path):
    base, handler = server
    body = _payload()
    handler.routes["/segclip.bin"] = (body, "drop")
    with pytest.raises(DownloadError, match="could not download|cut off") as err:
        resolve_segclip_checkpoint(cache_dir=tmp_path, url=f"{base}/segclip.bin", progress=False)
    assert f"{base}/segclip.bin" in str(err.value)
    assert os.listdir(tmp_path) == []


def test_offline_gives_clear_message(tmp_path):
    url = _free_port_url() + "/segclip.bin"
    with pytest.raises(DownloadError) as err:
        resolve_segclip_checkpoint(cache_dir=tmp_path / "ckpt", url=url, progress=False)
    msg = str(err.value)
    assert url in msg and "curl -L -o" in msg and str(tmp_path / "ckpt" / "segclip.bin") in msg
    assert not (tmp_path / "ckpt" / "segclip.bin").exists()
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_offline_env_refuses_without_network(server, tmp_path, monkeypatch):
    base, handler = server
    monkeypatch.setenv("SEGCLIP_OFFLINE", "1")
    with pytest.raises(DownloadError, match="SEGCLIP_OFFLINE"):
        resolve_segclip_checkpoint(cache_dir=tmp_path, url=f"{base}/segclip.bin", progress=False)
    assert handler.requests == []


def test_http_404(server, tmp_path):
    base, _ = server
    with pytest.raises(DownloadError, match="404"):
        resolve_segclip_checkpoint(cache_dir=tmp_path, url=f"{base}/nothing.bin", progress=False)
    assert os.listdir(tmp_path) == []


def _saved(state_dict, tmp_path):
    p = tmp_path / "served.bin"
    torch.save(state_dict, p)
    return p.read_bytes()


def test_segclip_download_verifies_keys(server, tmp_path):
    base, handler = server
    # The released file's exact key set (tensors shrunk: the check is on names, read without loading them whole).
    good = {k: torch.zeros(1) for k in segclip_checkpoint_keys()}
    handler.routes["/good/segclip.bin"] = (_saved(good, tmp_path), "ok")
    out = resolve_segclip_checkpoint(cache_dir=tmp_path / "a", url=f"{base}/good/segclip.bin", progress=False,
                                     expected_keys=segclip_checkpoint_keys)
    assert out == tmp_path / "a" / "segclip.bin"
    assert set(torch.load(out, weights_only=True)) == set(good)
    # One key short: rejected and removed.
    bad = dict(good)
    bad.pop("clip.visual.proj")
    handler.routes["/bad/segclip.bin"] = (_saved(bad, tmp_path), "ok")
    with pytest.raises(DownloadError, match="clip.visual.proj"):
        resolve_segclip_checkpoint(cache_dir=tmp_path / "b", url=f"{base}/bad/segclip.bin", progress=False,
                                   expected_keys=segclip_checkpoint_keys())
    assert os.listdir(tmp_path / "b") == []
    # Not a checkpoint at all (an HTML error page, as proxies send).
    handler.routes["/html/segclip.bin"] = (b"<html>blocked</html>", "ok")
    with pytest.raises(DownloadError, match="not valid"):
        resolve_segclip_checkpoint(cache_dir=tmp_path / "c", url=f"{base}/html/segclip.bin", progress=False)
    assert os.listdir(tmp_path / "c") == []


def test_expected_keys_match_released_checkpoint(vitb16_keys, reference):
    assert segclip_checkpoint_keys() == set(vitb16_keys["keys"])
    assert len(segclip_checkpoint_keys()) == 415
    # The same structure, sized like the tiny reference model (2 text layers), names its keys exactly too.
    check_segclip_keys(reference["segclip_state_dict"], segclip_checkpoint_keys(text_layers=2, text_width=64, vision_width=64))
    with pytest.raises(ValueError, match="missing"):
        check_segclip_keys(reference["segclip_state_dict"], segclip_checkpoint_keys())


def test_explicit_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        resolve_segclip_checkpoint(tmp_path / "typo.bin")
    f = tmp_path / "mine.bin"
    f.write_bytes(b"x")
    assert resolve_segclip_checkpoint(f) == f
    (tmp_path / "segclip.bin").write_bytes(b"x")  # already cached: returned without any download
    assert resolve_segclip_checkpoint(cache_dir=tmp_path, url=_free_port_url()) == tmp_path / "segclip.bin"
    with pytest.raises(FileNotFoundError, match="ViT-B/16"):
        resolve_clip_weights("ViT-L/99")


def test_clip_found_where_the_2022_readme_put_it(tmp_path, monkeypatch, repo_root, reference):
    """``modules/ViT-B-16.pt`` (the 2022 README's location) is used when the cache has no copy, without a download."""
    from modules.checkpoint import load_clip_state_dict
    assert download.LEGACY_CLIP_DIR == repo_root / "modules"
    monkeypatch.setattr(download, "LEGACY_CLIP_DIR", tmp_path / "modules")
    monkeypatch.setenv("SEGCLIP_OFFLINE", "1")   # any download attempt would raise
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="SEGCLIP_OFFLINE"):
        resolve_clip_weights("ViT-B/16", cache_dir=cache, progress=False)
    legacy = tmp_path / "modules" / "ViT-B-16.pt"
    legacy.parent.mkdir()
    torch.save(reference["clip_state_dict"], legacy)
    assert resolve_clip_weights("ViT-B/16", cache_dir=cache, progress=False) == legacy
    sd = load_clip_state_dict("ViT-B/16", cache_dir=cache)   # what --pretrained_clip_name ViT-B/16 does
    assert set(sd) == set(reference["clip_state_dict"])
    # a copy in the cache wins; a caller-chosen URL never picks up the legacy file
    cache.mkdir()
    (cache / "ViT-B-16.pt").write_bytes(b"x")
    assert resolve_clip_weights("ViT-B/16", cache_dir=cache, progress=False) == cache / "ViT-B-16.pt"
    other = f"http://127.0.0.1:9/{'0' * 64}/ViT-B-16.pt"
    with pytest.raises(DownloadError):
        resolve_clip_weights("ViT-B/16", cache_dir=tmp_path / "empty", url=other, progress=False)
