"""demo/app.py: the web demo, driven in a real headless browser (Debian's chromium + chromium-driver, selenium).

The browser test starts the app as a process on a free local port with the tiny reference checkpoint, uploads a
photo, types class names, downloads the label PNG and JSON through the page and compares them with what
``main_seg_vis.py`` writes for the same checkpoint and input; then it feeds the page bad input and checks that the
page says what is wrong and keeps working. Every request the page makes must go to the local server (offline).

Without chromium the browser test is skipped, except where SEGCLIP_REQUIRE_BROWSER=1 (.ci/run sets it): there a
missing browser is a failure. Set SEGCLIP_WEB_SCREENSHOT=PATH to keep the page's screenshot.
"""
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import UsageError
from demo import app

PIXEL_LIMIT = 200_000
REQUIRE_BROWSER = os.environ.get("SEGCLIP_REQUIRE_BROWSER", "").strip() not in ("", "0")


def _find(*names):
    return next((p for p in map(shutil.which, names) if p), None)


CHROMIUM = _find("chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER = _find("chromedriver", "chromium-driver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _offline_env(tmp_path):
    return dict(os.environ, SEGCLIP_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
                GRADIO_TEMP_DIR=str(tmp_path / "gradio"))


@pytest.fixture()
def server(repo_root, tiny_checkpoint, tmp_path):
    """`python demo/app.py` on a free port, serving until the test ends -> its URL."""
    port = _free_port()
    log = open(tmp_path / "app.log", "w")
    # pixel limit between chelsea (451 x 300) and astronaut (512 x 512), so the page can be shown a photo too large
    proc = subprocess.Popen([sys.executable, str(repo_root / "demo" / "app.py"), "--init_model", str(tiny_checkpoint),
                             "--port", str(port), "--device", "cpu", "--max_image_pixels", str(PIXEL_LIMIT)],
                            cwd=tmp_path, env=_offline_env(tmp_path), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"demo/app.py exited with {proc.returncode}:\n{(tmp_path / 'app.log').read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"demo/app.py did not answer within 180 s:\n{(tmp_path / 'app.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == 0, (tmp_path / "app.log").read_text()     # SIGTERM: a clean exit
    assert not list(Path(tempfile.gettempdir()).glob(f"segclip-web-*-{proc.pid}")), "result folder left behind"


@pytest.fixture()
def browser(tmp_path):
    if CHROMIUM is None or CHROMEDRIVER is None:
        msg = ("chromium and chromium-driver are not installed (apt-get install -y --no-install-recommends "
               "chromium chromium-driver)")
        if REQUIRE_BROWSER:
            pytest.fail(msg + " but SEGCLIP_REQUIRE_BROWSER is set")
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1150", "--lang=en-US"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    # Explicit driver and browser paths: selenium's manager (which would try the internet) is never run.
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def _wait(predicate, timeout=120, what="the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _text(driver, css):
    from selenium.webdriver.common.by import By
    els = driver.find_elements(By.CSS_SELECTOR, css)
    return els[0].text if els else ""


def _set_text(driver, css, value):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    box = driver.find_element(By.CSS_SELECTOR, css)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(value)


def _upload(driver, path):
    """Put ``path`` in the photo box (clearing the previous file first, as a user clicking its x would)."""
    from selenium.webdriver.common.by import By
    for clear in driver.find_elements(By.CSS_SELECTOR, '#photo button[aria-label="Clear"]'):
        clear.click()
    box = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"), what="an empty photo box")
    box[0].send_keys(str(path))


def _segment(driver, expect):
    """Click Segment and wait until the status line changes to one containing ``expect``."""
    from selenium.webdriver.common.by import By
    before = _text(driver, "#status")
    driver.find_element(By.CSS_SELECTOR, "#segment").click()
    return _wait(lambda: (t := _text(driver, "#status")) != before and expect in t and t, what=f"status '{expect}'")


def _download(driver, name):
    """Click the page's download link for ``name`` -> the downloaded file's bytes."""
    from selenium.webdriver.common.by import By
    target = driver.downloads / name
    if target.exists():
        target.unlink()
    # the file list re-renders a moment after the status line
    links = _wait(lambda: [a for a in driver.find_elements(By.CSS_SELECTOR, "#downloads a")
                           if a.get_attribute("download") == name], timeout=20, what=f"a download link for {name}")
    links[0].click()
    _wait(lambda: target.exists() and not list(driver.downloads.glob("*.crdownload")), timeout=60,
          what=f"download of {name}")
    return target.read_bytes()


def _full_page_screenshot(driver, path: Path):
    """The whole page, below the window's bottom edge too (Chrome DevTools protocol)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))


def _run_cli(repo_root, checkpoint, photo, classes, out, *extra):
    model = ["--init_model", str(checkpoint)] if checkpoint is not None else []
    proc = subprocess.run([sys.executable, str(repo_root / "main_seg_vis.py"), *model, "--input", str(photo),
                           "--classes", classes, "--output_dir", str(out), "--no_progress", "--device", "cpu", *extra],
                          cwd=repo_root, env=dict(os.environ, SEGCLIP_OFFLINE="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out / "labels"


def _same_label_png(downloaded: bytes, cli_png: Path, tmp_path: Path):
    got = tmp_path / "got.png"
    got.write_bytes(downloaded)
    a, b = Image.open(got), Image.open(cli_png)
    assert a.mode == b.mode == "P" and a.size == b.size
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.getpalette() == b.getpalette()
    assert downloaded == cli_png.read_bytes()


def _summary_without_path(payload):
    return {k: v for k, v in payload.items() if k != "image"}


@pytest.mark.slow   # 16 s (load 5) to 47 s (load 13) on the 2-core machine; a third is starting the app
def test_browser_upload_segment_download_and_bad_input(server, browser, repo_root, tiny_checkpoint, tmp_path):
    from selenium.webdriver.common.by import By
    chelsea = repo_root / "demo" / "examples" / "chelsea.jpg"
    started = time.monotonic()
    browser.get(server)
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"), what="the upload box")
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "not the released SegCLIP checkpoint" in body
    # the page says its limits: names (count and CLIP tokens), photo size
    assert f"At most {app.MAX_PAGE_NAMES} names, each at most 66 CLIP tokens long" in body
    assert "at most 0.2 megapixels, 50 MB" in body

    # 1. a photo and three names -> the CLI's label PNG and JSON, offered for download
    _upload(browser, chelsea)
    _wait(lambda: "451×300" in _text(browser, "#status"), what="the preview of the upload")
    _set_text(browser, "#classes textarea", "cat, wall, floor")
    status = _segment(browser, "Segmented chelsea.jpg")
    assert "(451×300) with 4 labels" in status
    png = _download(browser, "chelsea.png")
    summary = json.loads(_download(browser, "chelsea.json"))
    cli = _run_cli(repo_root, tiny_checkpoint, chelsea, "cat, wall, floor", tmp_path / "cli")
    _same_label_png(png, cli / "chelsea.png", tmp_path)
    assert _summary_without_path(summary) == _summary_without_path(json.loads((cli / "chelsea.json").read_text()))
    assert summary["vocabulary"] == ["background", "cat", "wall", "floor"] and summary["bg_thresh"] == 0.8
    # the shares table lists the JSON's classes with their percentages; both pictures are shown at full size
    rows = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#shares table.shares tbody tr"), timeout=20,
                 what="the shares table")
    assert [r.find_element(By.CSS_SELECTOR, "td.name").text for r in rows] == [c["name"] for c in summary["classes"]]
    assert [r.find_element(By.CSS_SELECTOR, "td.pct").text for r in rows] == \
        [f"{100 * c['share']:.1f}%" for c in summary["classes"]]
    for css in ("#overlay img", "#groups img"):
        size = _wait(lambda: browser.execute_script(f"const i = document.querySelector('{css}'); return i && "
                                                    "i.complete && i.naturalWidth ? [i.naturalWidth, i.naturalHeight] "
                                                    ": null"), timeout=20, what=f"the picture {css}")
        assert size == [451, 300], (css, size)
    shot = tmp_path / "web_demo.png"
    _full_page_screenshot(browser, shot)

    # 2. bad input: a file that is not an image, a photo above the pixel limit, duplicate names -> a message in
    # the page each time
    notes = tmp_path / "notes.jpg"
    notes.write_text("this is not an image")
    _upload(browser, notes)
    _wait(lambda: "not a readable image" in _text(browser, "#status"), what="the unreadable-file message")
    assert "notes.jpg" in _text(browser, "#status")
    status = _segment(browser, "not a readable image")
    # no stale results next to the error (the components re-render a moment after the status line)
    _wait(lambda: not browser.find_elements(By.CSS_SELECTOR, "#downloads a") and not _text(browser, "#shares"),
          timeout=20, what="the previous results to be cleared")
    _upload(browser, repo_root / "demo" / "examples" / "astronaut.jpg")
    _wait(lambda: "above the limit of 200,000 pixels" in _text(browser, "#status"), what="the pixel-limit message")
    assert "above the limit" in _segment(browser, "Could not segment")
    _upload(browser, chelsea)
    _wait(lambda: "451×300" in _text(browser, "#status"), what="the preview of the second upload")
    _set_text(browser, "#classes textarea", "cat, wall, cat")
    assert "duplicate class name 'cat'" in _segment(browser, "duplicate")

    # 3. the server still serves: background off this time, the labels again equal the CLI's (--no_bg)
    _set_text(browser, "#classes textarea", "cat, wall, floor")
    browser.find_element(By.CSS_SELECTOR, "#background input[type=checkbox]").click()
    assert "with 3 labels" in _segment(browser, "Segmented chelsea.jpg")
    png = _download(browser, "chelsea.png")
    cli = _run_cli(repo_root, tiny_checkpoint, chelsea, "cat, wall, floor", tmp_path / "cli_nobg", "--no_bg")
    _same_label_png(png, cli / "chelsea.png", tmp_path)
    print(f"browser test: {time.monotonic() - started:.1f} s in the page; screenshot {shot}")

    # offline: every request the page made went to the local server
    urls = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.add(message["params"]["request"]["url"])
    remote = sorted(u for u in urls if not u.startswith((server, "data:", "blob:")))
    assert not remote, remote
    if os.environ.get("SEGCLIP_WEB_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["SEGCLIP_WEB_SCREENSHOT"])


# ---------------------------------------------------------------------------------------------------------------
# Without a browser: the request handler and start-up

@pytest.fixture()
def segmenter(tiny_model, tiny_checkpoint, tmp_path):
    seg = app.WebSegmenter(tiny_model, tiny_checkpoint, released=False, device="cpu", work_dir=tmp_path / "work")
    yield seg
    seg.close()


@pytest.mark.parametrize("photo, classes, background, message", [
    (None, "cat", True, "upload a photo"),
    ("chelsea", "", True, "empty name"),
    ("chelsea", "cat, , dog", True, "empty name"),
    ("chelsea", "cat, dog, cat", True, "duplicate class name 'cat'"),
    ("chelsea", "background, cat", True, "added automatically"),
    ("notes", "cat", True, "notes.jpg: not a readable image"),
    # a synonym 'background' is a second background class as much as a class of that name
    ("chelsea", "cat, kitten\nwall, background", True, "added automatically"),
    # comment lines only: no class names (they were taken as names '# ...')
    ("chelsea", "# my classes\n# none yet", True, "every line starts with '#'"),
    # longer than CLIP's prompt (it would be cut silently), a huge name, a huge box, too many names
    ("chelsea", "cat, " + "big " * 70 + "dog", True, "CLIP tokens"),
    ("chelsea", "cat, " + "x" * 5000, True, "5,000 characters"),
    ("chelsea", "cat, " + "x" * 5 * 1024 * 1024, True, "this page takes at most 100,000"),
    ("chelsea", ", ".join(f"c{i}" for i in range(10_000)), True, "10,000 class names"),
    ("chelsea", "\n".join(f"thing{i}, other{i}" for i in range(200)), True, "400 class names"),
])
def test_bad_page_input_is_a_message(segmenter, repo_root, tmp_path, photo, classes, background, message):
    paths = {"chelsea": str(repo_root / "demo" / "examples" / "chelsea.jpg"), "notes": str(tmp_path / "notes.jpg"),
             None: None}
    (tmp_path / "notes.jpg").write_text("hello")
    started = time.monotonic()
    with pytest.raises(app.PageInputError, match=message.replace("(", r"\(")):
        segmenter.segment(paths[photo], classes, background)
    assert time.monotonic() - started < 5, "refused only after the work it should have saved"


def _page_event(page, name):
    """The function the page runs for its event ``name`` (gradio's api_name: the handler's name)."""
    return next(fn.fn for fn in page.fns.values() if fn.api_name == name)


def test_unexpected_errors_are_a_page_message(segmenter, repo_root, monkeypatch, caplog):
    """Errors from deeper than the page's own checks: a user error says what is wrong, anything else says it is
    not the user's fault; never gradio's bare 'Error' (an exception escaping the handler)."""
    page = app.build_page(segmenter)
    run, preview = _page_event(page, "run"), _page_event(page, "preview")
    chelsea = str(repo_root / "demo" / "examples" / "chelsea.jpg")

    def deep_usage_error(*a, **k):
        raise UsageError("class names: duplicate class name 'x' (classes 0 and 3)")
    monkeypatch.setattr(segmenter, "demo_for", deep_usage_error)
    *outputs, status = run(chelsea, "cat", True, 0.8, "simple")
    assert outputs == [None, None, "", None]
    assert "Could not segment: class names: duplicate class name &#x27;x&#x27; (classes 0 and 3)." in status

    def bug(*a, **k):
        raise RuntimeError("shape mismatch deep inside")
    monkeypatch.setattr(segmenter, "demo_for", bug)
    *outputs, status = run(chelsea, "cat", True, 0.8, "simple")
    assert "Could not segment: an internal error (RuntimeError)" in status and "server&#x27;s log" in status
    assert "shape mismatch" not in status and "shape mismatch deep inside" in caplog.text   # the log has it

    monkeypatch.setattr(app, "PREVIEW_SIDE", None)      # the preview breaks (a bug): a message, not 'Error'
    shown, status = preview(chelsea)
    assert shown is None and "Could not read the photo: an internal error (TypeError)" in status
    page.close()


def test_page_fetches_no_url_caps_uploads_and_prunes_its_cache(segmenter, repo_root, monkeypatch):
    """The running page (the launch settings of main): an http(s) URL given through the API instead of an upload
    is refused without a connection; an upload above --max_upload_mb is refused (HTTP 413); uploads are swept out
    of gradio's cache once older than CACHE_AGE_S."""
    import gradio.processing_utils
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    fetched = []

    async def download(url, cache_dir):
        fetched.append(url)
        raise OSError("the test allows no download")
    monkeypatch.setattr(gradio.processing_utils, "async_ssrf_protected_download", download)
    monkeypatch.setattr(app, "CACHE_SWEEP_S", 1)
    monkeypatch.setattr(app, "CACHE_AGE_S", 1)
    page = app.build_page(segmenter, max_upload_mb=1)
    port = _free_port()
    app.launch_page(page, "127.0.0.1", port, max_upload_mb=1, block=False)
    url = f"http://127.0.0.1:{port}/"
    try:
        def upload(name, data):
            boundary = "segclip-test-boundary"
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                    "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
            req = urllib.request.Request(url + "gradio_api/upload", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        code, _ = upload("big.jpg", b"\xff" * 1_500_000)
        assert code == 413
        code, paths = upload("chelsea.jpg", (repo_root / "demo" / "examples" / "chelsea.jpg").read_bytes())
        assert code == 200 and Path(paths[0]).is_file()
        _wait(lambda: not Path(paths[0]).exists(), timeout=20, what="the upload to be swept out of the cache")

        client = Client(url, verbose=False)
        remote = {"path": "https://example.com/cat.jpg", "url": "https://example.com/cat.jpg",
                  "meta": {"_type": "gradio.FileData"}}
        with pytest.raises(AppError, match="does not fetch photos from the internet"):
            client.predict(remote, "cat", True, 0.8, "simple", api_name="/run")
        assert fetched == []
    finally:
        page.close()


def test_photo_above_the_pixel_limit(tiny_model, tiny_checkpoint, repo_root, tmp_path):
    seg = app.WebSegmenter(tiny_model, tiny_checkpoint, released=False, device="cpu", max_image_pixels=100_000,
                           work_dir=tmp_path / "work")
    with pytest.raises(app.PageInputError, match=r"chelsea.jpg: 451 x 300 = 135,300 pixels is above the limit of 100,000"):
        seg.segment(str(repo_root / "demo" / "examples" / "chelsea.jpg"), "cat")
    seg.close()


def test_page_pixel_limit_is_a_shared_servers(tiny_model, tiny_checkpoint, tmp_path, capsys):
    """The page's default --max_image_pixels is 4096 x 4096, not Pillow's 89 million: a 9000 x 9000 PNG of a few
    KB (5.9 GB to decode and draw) is refused from its header; --max_upload_mb must be positive."""
    args = app.get_args([])
    assert args.max_image_pixels == app.PAGE_MAX_IMAGE_PIXELS == 4096 * 4096 and args.max_upload_mb == 50
    Image.new("L", (9000, 9000)).save(tmp_path / "huge.png")
    assert (tmp_path / "huge.png").stat().st_size < 200_000
    seg = app.WebSegmenter(tiny_model, tiny_checkpoint, released=False, device="cpu",
                           max_image_pixels=args.max_image_pixels, work_dir=tmp_path / "work")
    with pytest.raises(app.PageInputError, match="huge.png: 9000 x 9000 = 81,000,000 pixels is above the limit of "
                                                 "16,777,216"):
        seg.segment(str(tmp_path / "huge.png"), "cat")
    seg.close()
    assert app.main(["--max_upload_mb", "0"]) == 2
    assert capsys.readouterr().err == "error: --max_upload_mb must be positive, got 0\n"


def test_background_as_a_class_without_background(segmenter, repo_root):
    r = segmenter.segment(str(repo_root / "demo" / "examples" / "chelsea.jpg"), "cat, background", background=False)
    assert r["summary"]["vocabulary"] == ["cat", "background"] and r["summary"]["background"] is False
    assert Image.open(r["label_png"]).size == (451, 300)


def test_old_results_are_removed(segmenter, repo_root, monkeypatch):
    monkeypatch.setattr(app, "KEEP_RESULTS", 2)
    photo = str(repo_root / "demo" / "examples" / "chelsea.jpg")
    first = segmenter.segment(photo, "cat")
    for _ in range(2):
        last = segmenter.segment(photo, "cat")
    assert not first["label_png"].exists() and last["label_png"].exists()
    assert len(list(segmenter.work_dir.iterdir())) == 2


def test_synonym_lines_are_a_classes_file(segmenter, repo_root, tiny_checkpoint, tmp_path):
    """Several lines in the names box = a --classes_file: a class per line, its synonyms after commas."""
    chelsea = repo_root / "demo" / "examples" / "chelsea.jpg"
    text = "cat, kitten\n\nwall, brick wall\nfloor\n"
    r = segmenter.segment(str(chelsea), text)
    assert r["summary"]["vocabulary"] == ["background", "cat", "wall", "floor"]
    (tmp_path / "names.txt").write_text(text)
    proc = subprocess.run([sys.executable, str(repo_root / "main_seg_vis.py"), "--init_model", str(tiny_checkpoint),
                           "--input", str(chelsea), "--classes_file", str(tmp_path / "names.txt"), "--output_dir",
                           str(tmp_path / "cli"), "--no_progress", "--device", "cpu"], cwd=repo_root,
                          env=dict(os.environ, SEGCLIP_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _same_label_png(r["label_png"].read_bytes(), tmp_path / "cli" / "labels" / "chelsea.png", tmp_path)
    with pytest.raises(app.PageInputError, match="duplicate class name .Kitten."):
        segmenter.segment(str(chelsea), "cat, kitten\nKitten\n")


def test_method_sclip_is_the_clis(clip_file, repo_root, tmp_path):
    """--method sclip: the plain CLIP with SCLIP's head, the same labels as main_seg_vis.py; no center view."""
    chelsea = repo_root / "demo" / "examples" / "chelsea.jpg"
    args = app.get_args(["--method", "sclip", "--pretrained_clip_name", str(clip_file), "--device", "cpu",
                         "--resolution", "224"])
    seg = app.load_segmenter(args)
    try:
        assert not seg.has_centers and "--method sclip" in app.model_line(seg)
        r = seg.segment(str(chelsea), "cat, wall, floor")
        assert r["groups"] is None and r["summary"]["vocabulary"] == ["background", "cat", "wall", "floor"]
        cli = _run_cli(repo_root, None, chelsea, "cat, wall, floor", tmp_path / "cli", "--method", "sclip",
                       "--pretrained_clip_name", str(clip_file), "--resolution", "224")
        _same_label_png(r["label_png"].read_bytes(), cli / "chelsea.png", tmp_path)
    finally:
        seg.close()


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("SEGCLIP_OFFLINE", "1")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")


def test_missing_released_checkpoint_says_so(offline, tmp_path, capsys):
    assert app.main(["--cache_dir", str(tmp_path / "none"), "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "released SegCLIP checkpoint" in err and "--init_model" in err


def test_explicit_missing_checkpoint(offline, tmp_path, capsys):
    assert app.main(["--init_model", str(tmp_path / "nope.bin"), "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "checkpoint not found" in err


def test_port_in_use(offline, tiny_checkpoint, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert app.main(["--init_model", str(tiny_checkpoint), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "cannot serve on 127.0.0.1" in err and "--port" in err
