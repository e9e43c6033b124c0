"""Fault injection at the entry points: bad checkpoint files, downloads that fail or race, caches that cannot be
written. Each case ends in one line ``error: ...`` and exit status 2, saying what the file is and what to do."""
import http.server
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import main_seg_vis
import main_seg_zeroshot
from common import download
from common.download import DownloadError, resolve_segclip_checkpoint
from common.errors import brief
from common.fileio import temporary_name
from modules.checkpoint import CheckpointError, load_clip, load_segclip, load_state_dict_file
from tests.test_train_loop import tiny_store  # noqa: F401  (fixture)


def _one_line_error(capsys):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "weights_only=False" not in err
    return lines[0]


def _vis(ckpt, tmp_path):
    image = tmp_path / "photo.png"
    if not image.exists():
        from PIL import Image
        Image.new("RGB", (40, 40), (200, 10, 10)).save(image)
    return main_seg_vis.main(["--input", str(image), "--init_model", str(ckpt), "--output_dir", str(tmp_path / "o"),
                              "--classes", "red, blue", "--no_progress", "--device", "cpu"])


@pytest.fixture()
def damaged(tmp_path, tiny_checkpoint):
    """Files a user may hold instead of a checkpoint."""
    data = tiny_checkpoint.read_bytes()
    files = {
        "empty": (tmp_path / "empty.bin", b""),
        "html": (tmp_path / "segclip.bin", b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n"),
        "truncated": (tmp_path / "cut.bin", data[: len(data) // 2]),
        "partial": (temporary_name(tmp_path / "segclip.bin"), data[: len(data) // 3]),
        "legacy_truncated": (tmp_path / "old.bin", None),
    }
    for name, (path, content) in files.items():
        if content is not None:
            path.write_bytes(content)
    old = tmp_path / "old_full.bin"
    torch.save({"a": torch.zeros(64)}, old, _use_new_zipfile_serialization=False)
    files["legacy_truncated"][0].write_bytes(old.read_bytes()[:300])
    return {k: v[0] for k, v in files.items()}


@pytest.mark.parametrize("case, words", [
    ("empty", ["is empty (0 bytes)", "delete it and download it again"]),
    ("html", ["is an HTML page", "delete it and download it again"]),
    ("truncated", ["is truncated", "the end of the archive is missing", "delete it and download it again"]),
    ("partial", ["unfinished download", "delete it and download it again"]),
    ("legacy_truncated", ["is truncated or damaged", "delete it and download it again"]),
])
def test_damaged_checkpoint_says_what_it_is(case, words, damaged, tmp_path, capsys):
    """Before: a 0-byte file crashed the message formatter with IndexError (a traceback); the others printed the
    first 200 characters of torch's message."""
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(damaged[case])
    for w in words:
        assert w in str(e.value), str(e.value)
    assert _vis(damaged[case], tmp_path) == 2
    line = _one_line_error(capsys)
    assert str(damaged[case]) in line and words[0] in line


def test_demo_disk_full_is_one_line_exit_2(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """Before: a catch-all of OSError in main_seg_vis.py printed 'cannot write results' and exited 1."""
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    assert _vis(tiny_checkpoint, tmp_path) == 2
    line = _one_line_error(capsys)
    assert "no space left" in line and str(tmp_path / "o") in line


def test_pickle_of_python_objects_is_refused_without_unsafe_advice(tmp_path, capsys):
    path = tmp_path / "whole_model.bin"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)     # a whole module, not its state dict
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(path)
    msg = str(e.value)
    assert "holds Python objects" in msg and "torch.nn.modules.linear.Linear" in msg
    assert "weights_only" not in msg and "torch.save(model.state_dict(), path)" in msg
    assert _vis(path, tmp_path) == 2
    _one_line_error(capsys)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize("how", ["torch.save", "pickle protocol 0", "pickle protocol 1"])
def test_pickle_that_would_run_code_says_so(how, tmp_path, capsys):
    """Poor case of issue 21. Before: torch.save's zip file said 'a damaged archive ... delete it and download it
    again', an old-protocol pickle 'not a weights-only PyTorch checkpoint'; neither said it is refused because
    reading it would run code (here: os.system)."""
    import pickle
    path = tmp_path / "weights.bin"
    if how == "torch.save":
        torch.save({"w": torch.zeros(2), "x": _RunsCode()}, path)
    else:
        path.write_bytes(pickle.dumps({"x": _RunsCode()}, protocol=int(how[-1])))
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path} holds Python objects (such as {os.system.__module__}.system)"), msg
    assert "would run code, so the file is refused" in msg and "download it again" not in msg
    assert _vis(path, tmp_path) == 2
    assert "would run code" in _one_line_error(capsys)


def test_brief_keeps_whole_sentences_and_drops_unsafe_advice():
    e = RuntimeError("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will "
                     "likely succeed. " + "x" * 300 + ". Last.")
    text = brief(e)
    assert text == "RuntimeError: Weights only load failed."        # the long sentence does not fit: left out whole
    assert brief(EOFError()) == "EOFError"                          # before: IndexError on the empty message
    long = ValueError("a" * 250 + ". b.")
    assert brief(long) == "ValueError: " + "a" * 250 + "."          # the first sentence is never cut


def test_openai_clip_state_dict_as_init_model_names_the_flag(reference, tmp_path, capsys):
    path = tmp_path / "ViT-B-16-like.pt"
    torch.save(reference["clip_state_dict"], path)
    with pytest.raises(CheckpointError, match="OpenAI CLIP state dict.*--pretrained_clip_name"):
        load_segclip(path)
    assert _vis(path, tmp_path) == 2
    assert "--pretrained_clip_name" in _one_line_error(capsys)
    from modules.modeling import SegCLIP
    from modules.state_dict import load_into
    model = SegCLIP.from_clip(reference["clip_state_dict"], first_stage_layer=10)
    with pytest.raises(CheckpointError, match="--pretrained_clip_name"):   # training's --init_model path
        load_into(model, reference["clip_state_dict"])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(value, reference, tmp_path, capsys):
    """Before: loaded, exit 0, every pixel one class."""
    sd = dict(reference["segclip_state_dict"])
    bad = sd["clip.visual.proj"].clone()
    bad[0, 0] = value
    sd["clip.visual.proj"] = bad
    path = tmp_path / "diverged.bin"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="tensor clip.visual.proj holds"):
        load_state_dict_file(path)
    assert _vis(path, tmp_path) == 2
    assert "clip.visual.proj" in _one_line_error(capsys)


def _poisoned(sd, key, value=float("nan")):
    sd = {k: v.clone().contiguous() for k, v in sd.items()}
    sd[key].view(-1)[0] = value
    return sd


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_non_finite_weights_are_refused_in_every_format(value, reference, clip_file, tmp_path, capsys):
    """Issue 21, bad 6. Before: the same damaged tensor was refused in a .pt file but loaded from a .safetensors
    file, a Hugging Face folder or a TorchScript archive (every pixel background, exit 0)."""
    from safetensors.torch import save_file
    # a SegCLIP checkpoint as .safetensors, through the demo script: one line, exit 2
    segclip = tmp_path / "segclip.safetensors"
    save_file(_poisoned(reference["segclip_state_dict"], "clip.visual.proj", value), str(segclip))
    assert _vis(segclip, tmp_path) == 2
    assert "segclip.safetensors: tensor clip.visual.proj holds" in _one_line_error(capsys)
    # CLIP weights as .safetensors, through the evaluation of a training-free method: one line, exit 2
    clip_sd = torch.load(clip_file, weights_only=True)
    clip = tmp_path / "clip.safetensors"
    save_file(_poisoned(clip_sd, "visual.proj", value), str(clip))
    from tests.helpers import write_fake_dataset
    voc = write_fake_dataset("voc", tmp_path / "VOC2012", num_images=1, size=(64, 48))
    assert main_seg_zeroshot.main(["--method", "clip", "--pretrained_clip_name", str(clip), "--dataset", "voc",
                                   "--data_root", voc, "--num_workers", "0", "--no_progress"]) == 2
    assert "clip.safetensors: tensor visual.proj holds" in _one_line_error(capsys)
    # a Hugging Face CLIP folder (its weights file is checked before any key is mapped)
    hf = tmp_path / "hf-clip"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "clip", "text_config": {}, "vision_config": {}}')
    save_file({"vision_model.post_layernorm.weight": torch.tensor([1.0, value])}, str(hf / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.safetensors: tensor vision_model.post_layernorm.weight holds"):
        load_clip(str(hf))
    # a TorchScript archive (OpenAI's CLIP format), read without running it
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.bias[1] = value
    torch.jit.save(torch.jit.script(net), str(tmp_path / "scripted.pt"))
    with pytest.raises(CheckpointError, match="scripted.pt: tensor bias holds"):
        load_state_dict_file(tmp_path / "scripted.pt")


# ---------------------------------------------------------------------------------------------- downloads
class _SlowHandler(http.server.BaseHTTPRequestHandler):
    body = b""
    requests = []

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        for i in range(0, len(self.body), 4096):   # slow enough that a second process arrives mid-download
            self.wfile.write(self.body[i:i + 4096])
            time.sleep(0.02)

    def log_message(self, *args):
        pass


@pytest.fixture()
def slow_server(tiny_checkpoint):
    _SlowHandler.body, _SlowHandler.requests = tiny_checkpoint.read_bytes()[:120_000], []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/segclip.bin", _SlowHandler
    httpd.shutdown()
    httpd.server_close()


def test_processes_sharing_a_cache_download_once(slow_server, tmp_path, repo_root):
    """Before: every rank of a torchrun job downloaded the 755 MB file into the same folder at once."""
    url, handler = slow_server
    code = ("import sys; from common.download import download_file; "
            "print('GOT', download_file(sys.argv[1], sys.argv[2], progress=False))")
    dest = tmp_path / "cache" / "segclip.bin"
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(dest)], cwd=repo_root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all(f"GOT {dest}" in out for out, _ in outs)
    assert handler.requests == ["/segclip.bin"]                       # one download
    assert sum("waiting for another process" in out for out, _ in outs) >= 1
    assert dest.read_bytes() == handler.body
    assert sorted(os.listdir(dest.parent)) == ["segclip.bin"]          # no lock or temporary left


def test_stale_temporaries_are_removed_by_the_next_download(slow_server, tmp_path):
    url, handler = slow_server
    cache = tmp_path / "cache"
    cache.mkdir()
    from tests.test_infer_faults import killed_runs_temporary
    killed_runs_temporary(cache / "segclip.bin").write_bytes(b"half")       # a killed download's
    for name in (".segclip.bin.k3j2h1.part", ".segclip.bin.tmp-999999999", "keep.txt"):   # not ours: kept
        (cache / name).write_text("not ours")
    download.download_file(url, cache / "segclip.bin", progress=False)
    assert sorted(os.listdir(cache)) == [".segclip.bin.k3j2h1.part", ".segclip.bin.tmp-999999999", "keep.txt",
                                         "segclip.bin"]


def test_unwritable_cache_is_one_line(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.delenv("SEGCLIP_OFFLINE", raising=False)
    monkeypatch.setenv("SEGCLIP_CACHE", str(blocker / "cache"))
    with pytest.raises(DownloadError, match="cannot create the cache folder.*SEGCLIP_CACHE"):
        resolve_segclip_checkpoint(url="http://127.0.0.1:9/segclip.bin", progress=False)


@pytest.mark.skipif(os.access("/sys", os.W_OK) and not os.path.ismount("/sys"), reason="needs a read-only folder")
def test_read_only_cache_is_one_line(tmp_path, capsys, monkeypatch):
    """SEGCLIP_CACHE on a folder nobody may write (here /sys, which refuses even root). Before: a traceback from
    tempfile.mkstemp."""
    monkeypatch.delenv("SEGCLIP_OFFLINE", raising=False)
    monkeypatch.setenv("SEGCLIP_CACHE", "/sys")
    image = tmp_path / "p.png"
    from PIL import Image
    Image.new("RGB", (32, 32)).save(image)
    rc = main_seg_vis.main(["--input", str(image), "--output_dir", str(tmp_path / "o"), "--classes", "a, b",
                            "--no_progress", "--device", "cpu"])
    assert rc == 2
    line = _one_line_error(capsys)
    assert "/sys" in line and "SEGCLIP_CACHE" in line and "curl" in line


def test_download_error_in_training_is_one_line(tmp_path, repo_root, tiny_store, monkeypatch):  # noqa: F811
    """--pretrained_clip_name ViT-B/16 with no network. Before: DownloadError escaped main() as a traceback."""
    env = dict(os.environ, SEGCLIP_OFFLINE="1", SEGCLIP_CACHE=str(tmp_path / "cache"), CUDA_VISIBLE_DEVICES="")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    if (download.LEGACY_CLIP_DIR / "ViT-B-16.pt").is_file():
        pytest.skip("a ViT-B-16.pt in modules/ would be used without a download")
    p = subprocess.run([sys.executable, str(repo_root / "main_task_align.py"), "--do_pretrain", "--datatype", "cc",
                        "--cc_store", str(tiny_store), "--output_dir", str(tmp_path / "out"), "--batch_size", "2",
                        "--num_thread_reader", "0", "--no_progress", "--pretrained_clip_name", "ViT-B/16"],
                       cwd=tmp_path, env=dict(env, PYTHONPATH=str(repo_root)), capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "SEGCLIP_OFFLINE" in lines[0] and "curl" in lines[0], p.stderr[-2000:]


def test_eval_init_model_none_seed_is_wired(reference, tmp_path, monkeypatch):
    """--seed sets the fresh centers of --init_model none (before: accepted and ignored)."""
    clip = tmp_path / "clip.pt"
    torch.save(reference["clip_state_dict"], clip)
    models = []
    for seed in (1, 1, 2):
        args = main_seg_zeroshot.parse_args(["--init_model", "none", "--pretrained_clip_name", str(clip),
                                             "--seed", str(seed)])
        models.append(main_seg_zeroshot.load_model(args, "segclip", torch.device("cpu"), {}))
    key = "clip.visual.transformer.semantic_layer2.semantic_center"
    a, b, c = (m.state_dict()[key] for m in models)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_launcher_without_rendezvous_is_one_line(tmp_path, capsys, monkeypatch):
    """WORLD_SIZE > 1 without MASTER_ADDR: a DistributedSetupError, printed by run_main (the training script no
    longer catches every RuntimeError around the process-group setup)."""
    import main_task_align
    for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    rc = main_task_align.main(["--do_pretrain", "--output_dir", str(tmp_path / "o"), "--device", "cpu",
                               "--datatype", "cc", "--cc_store", str(tmp_path)])   # data paths are checked first
    assert rc == 2
    assert "MASTER_ADDR" in _one_line_error(capsys)
