"""Web demo: segment a photo with your own words in the browser (Gradio; design.md §8).

    pip install -r requirements-demo.txt
    python demo/app.py                                    # the released checkpoint, http://127.0.0.1:7860
    python demo/app.py --init_model output/quickstart/train/pytorch_model.bin.1 --port 7861
    python demo/app.py --method sclip                     # training-free, OpenAI's CLIP (no center view)

Upload a photo (or pick one of demo/examples/), type class names, set the background threshold or turn background
off; the page shows the overlay with names and a legend, each class's pixel share and the center-assignment map,
and offers the label PNG and JSON for download. The model is loaded once at start-up and reused. Every result is
produced by the library calls ``main_seg_vis.py`` makes (``load_demo_model``, ``run_visualization``), so the
label PNG downloaded from the page is the CLI's for the same checkpoint, photo and vocabulary. Nothing is fetched
from the internet: analytics are off and the page uses local fonts.
"""
import html
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from common import cli
from common.errors import SegCLIPError, UsageError
from common.images import DEFAULT_MAX_IMAGE_PIXELS
from modules.precision import PRECISIONS
from seg_segmentation.methods import METHODS

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
# What the page shows and the JSON/PNG it offers: the CLI's overlay and center-assignment modes (design.md §8).
OVERLAY_MODE, GROUPS_MODE = "input_pred_label", "all_groups"
DEFAULT_BG_THRESH = 0.8          # the CLI's default for your own classes (BG_THRESH['voc'])
PREVIEW_SIDE = 1024              # the uploaded photo is previewed at most this large (inference uses the original)
KEEP_RESULTS = 8                 # result folders kept on disk (gradio copies what it serves into its own cache)
# Limits of a page shared by many users (each request holds the model alone: requests are answered one at a time).
MAX_PAGE_NAMES = 256             # class names incl. synonyms (every benchmark's synonym file fits: at most 219)
MAX_PAGE_TEXT = 100_000          # characters in the names box, refused before it is even split into names
# Decoding a photo and drawing its results costs about 33 bytes per pixel (measured: +545 MB for 4096 x 4096), so
# the page's default pixel limit is far below Pillow's 89 million (about 3 GB per request; a 79 KB PNG can claim
# it): 4096 x 4096 takes any 12-megapixel phone photo. --max_image_pixels changes it.
PAGE_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_UPLOAD_MB = 50
# Gradio keeps every upload and every file it serves in its cache; sweep it every CACHE_SWEEP_S seconds, removing
# files older than CACHE_AGE_S (results stay downloadable for an hour).
CACHE_SWEEP_S, CACHE_AGE_S = 600, 3600
logger = logging.getLogger(__name__)


class DemoSetupError(SegCLIPError, RuntimeError):
    """The demo cannot start (gradio missing, checkpoint missing, address taken); the message says how to fix it."""


class PageInputError(SegCLIPError, ValueError):
    """Something typed or uploaded in the page cannot be segmented; the message is shown in the page."""


def build_parser():
    p = cli.make_parser(__doc__)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind: 127.0.0.1 serves this machine only, 0.0.0.0 your network")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    p.add_argument("--max_upload_mb", type=int, default=DEFAULT_MAX_UPLOAD_MB,
                   help="largest photo file the page accepts, in MB")
    cli.add_segmenter_args(
        p, methods=METHODS, init_model_help="SegCLIP checkpoint (state dict), e.g. the quickstart's train/pytorch_model.bin.1. "
                           "Default: <cache>/segclip.bin, the released checkpoint, downloaded when missing",
        precisions=PRECISIONS, max_long=False, first_stage_layer=None)
    cli.add_runtime_args(p, distributed=False)
    # the page always segments with your own class names: the SCLIP head preset is then voc's, as in
    # main_seg_vis.py with --classes (its --dataset default)
    p.set_defaults(dataset="voc", max_image_pixels=PAGE_MAX_IMAGE_PIXELS)
    for action in p._actions:
        if action.dest == "max_image_pixels":   # a shared server's limit, not Pillow's (see PAGE_MAX_IMAGE_PIXELS)
            action.help = ("refuse photos with more pixels, read from the file header before anything is decoded; "
                           "each pixel costs about 33 bytes of memory while a request runs; 0 = no limit")
    return p


def get_args(argv=None):
    args = cli.parse(build_parser(), argv)
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be in [1, 65535], got {args.port}")
    cli.check_positive(args, "max_upload_mb")
    cli.check_segmenter_args(args, METHODS)
    return args


# ---------------------------------------------------------------------------------------------------------------
# The model side: no gradio here, so it is testable without a browser.

class WebSegmenter:
    """One loaded model serving many requests: a vocabulary + settings -> a cached ``SegmentationDemo``; a photo ->
    the files ``main_seg_vis.py`` writes for it (overlay, center map, label PNG, JSON) in a fresh folder."""

    def __init__(self, model, checkpoint: Optional[Path], released: bool, device, crop: int = 224, stride: int = 224,
                 resolution: int = 224, max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                 work_dir: Optional[Path] = None, method: str = "segclip", head: Optional[Dict] = None,
                 templates: str = "simple", weights: Optional[str] = None, vfm_weights: Optional[str] = None):
        self.model, self.released, self.device = model, released, device
        self.vfm_weights = vfm_weights
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.method, self.head, self.templates, self.weights = method, dict(head or {}), templates, weights
        self.crop, self.stride, self.resolution = crop, stride, resolution
        self.max_image_pixels = max_image_pixels
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="segclip-web-", suffix=f"-{os.getpid()}"))
        self._demos: "OrderedDict[tuple, object]" = OrderedDict()   # vocabulary + settings -> SegmentationDemo
        self._results: List[Path] = []
        self._count = 0
        self._lock = threading.Lock()   # one request at a time uses the model (the page's events run in threads)

    def vocabulary(self, classes: str, background: bool) -> Tuple[List[str], Optional[List[List[str]]]]:
        """The page's class names -> (names, synonyms or None), read as main_seg_vis.py reads them: one line is
        --classes ("cat, wall, floor": a class per comma); several lines are a --classes_file (a class per line,
        its synonyms separated by commas: "cat, kitten"; lines starting with '#' are comments). At most
        MAX_PAGE_NAMES names in all, each short enough for CLIP's prompt (seg_segmentation.classes)."""
        from seg_segmentation.classes import name_lines, parse_class_list, refuse_listed_background
        from seg_segmentation.synonyms import parse_name_lines
        text = classes or ""
        if len(text) > MAX_PAGE_TEXT:
            raise PageInputError(f"the class names are {len(text):,} characters long; this page takes at most "
                                 f"{MAX_PAGE_TEXT:,}")
        synonyms = None
        try:
            lines = name_lines(text)
            if not lines and text.strip():
                raise PageInputError("no class names: every line starts with '#' (a comment)")
            if len(lines) > 1:
                synonyms = parse_name_lines(lines, source="class names")
                names = [c[0] for c in synonyms]
            else:
                names = parse_class_list(lines[0] if lines else text, source="class names")
            every_name = [n for c in synonyms for n in c] if synonyms is not None else names
            if len(every_name) > MAX_PAGE_NAMES:
                raise PageInputError(f"{len(every_name):,} class names (synonyms included); this page takes at "
                                     f"most {MAX_PAGE_NAMES}")
            if background:   # a synonym 'background' would be a second background class too
                refuse_listed_background(every_name, "or untick 'background'")
        except SegCLIPError as e:
            raise PageInputError(str(e)) from None
        return names, synonyms

    def demo_for(self, names: Sequence[str], synonyms, background: bool, bg_thresh: float, templates: str):
        """The SegmentationDemo (text embeddings computed once) for this vocabulary and these settings."""
        from seg_segmentation.visualize import SegmentationDemo
        key = (tuple(names), None if synonyms is None else tuple(map(tuple, synonyms)), bool(background),
               float(bg_thresh), templates)
        if key not in self._demos:
            self._demos[key] = SegmentationDemo(self.model, names, with_bg=background, bg_thresh=float(bg_thresh),
                                                templates=templates, crop=self.crop, stride=self.stride,
                                                resolution=self.resolution, method=self.method, head=self.head,
                                                synonyms=synonyms)
            while len(self._demos) > 4:
                self._demos.popitem(last=False)
        self._demos.move_to_end(key)
        return self._demos[key]

    @property
    def has_centers(self) -> bool:
        return self.method == "segclip"

    def segment(self, photo: Optional[str], classes: str, background: bool = True,
                bg_thresh: float = DEFAULT_BG_THRESH, templates: Optional[str] = None) -> Dict:
        """-> {'overlay', 'groups' (None without centers), 'label_png', 'json': paths, 'summary': the JSON's
        content, 'seconds'}. ``templates`` None: the method's default (--templates).

        Raises PageInputError (shown in the page) for a missing or unreadable photo, one above the pixel limit,
        and for bad class names."""
        from seg_segmentation.visualize import run_visualization
        if not photo:
            raise PageInputError("upload a photo (or pick an example) first")
        names, synonyms = self.vocabulary(classes, background)
        if not 0.0 <= float(bg_thresh) <= 1.0:
            raise PageInputError(f"the background threshold must be in [0, 1], got {bg_thresh}")
        modes = [OVERLAY_MODE, GROUPS_MODE] if self.has_centers else [OVERLAY_MODE]
        with self._lock:
            demo = self.demo_for(names, synonyms, background, bg_thresh, templates or self.templates)
            out = self._new_result_dir()
            start = time.perf_counter()
            report = run_visualization(demo, [Path(photo)], out, modes=modes, progress=False,
                                       max_image_pixels=self.max_image_pixels)
            seconds = time.perf_counter() - start
        if not report["written"]:
            reason = report["skipped"][0][1] if report["skipped"] else "nothing was written"
            # the reader names the uploaded file by its temporary path; the user knows it by its own name
            raise PageInputError(reason.replace(str(photo), Path(photo).name))
        name = report["written"][0]
        files = {Path(f).name: Path(f) for f in report["files"]}
        json_path = files[f"{name}.json"]
        return {"overlay": files[f"{OVERLAY_MODE}_{name}.jpg"], "groups": files.get(f"{GROUPS_MODE}_{name}.jpg"),
                "label_png": files[f"{name}.png"], "json": json_path,
                "summary": json.loads(json_path.read_text()), "seconds": seconds}

    def _new_result_dir(self) -> Path:
        self._count += 1
        out = self.work_dir / f"result-{self._count:05d}"
        self._results.append(out)
        while len(self._results) > KEEP_RESULTS:
            shutil.rmtree(self._results.pop(0), ignore_errors=True)
        return out

    def close(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)


def example_class_names(path: Path) -> str:
    """An example's class-name file (one class per line) -> the page's names box, read as every class-name file
    is (``seg_segmentation.classes``: UTF-8 with or without a byte-order mark, '#' lines skipped)."""
    from seg_segmentation.classes import name_lines, read_name_text
    return ", ".join(name_lines(read_name_text(path, "example class names")))


def load_segmenter(args) -> WebSegmenter:
    """Load the model once, as main_seg_vis.py does (``load_demo_model``): SegCLIP from --init_model or the
    released checkpoint (downloaded when missing), or the CLIP of --pretrained_clip_name for sclip / clip."""
    from common.download import SEGCLIP_FILENAME, DownloadError, default_cache_dir
    from seg_segmentation.visualize import load_demo_model
    device = cli.resolve_device(args.device)
    released_path = default_cache_dir(args.cache_dir) / SEGCLIP_FILENAME
    try:
        model, head, ckpt = load_demo_model(args, device)
    except DownloadError as e:     # the message says what to fetch and what runs without it
        if args.method != "segclip" or args.init_model is not None:
            raise
        raise DemoSetupError(f"the released SegCLIP checkpoint is needed without --init_model: {e}") from None
    released = args.method == "segclip" and Path(ckpt).resolve() == released_path.resolve()
    return WebSegmenter(model, ckpt, released, device, crop=args.crop_size, stride=args.stride,
                        resolution=args.resolution, max_image_pixels=args.max_image_pixels, method=args.method,
                        head=head, templates=args.templates, weights=args.pretrained_clip_name,
                        vfm_weights=(getattr(args, "vfm", None) or METHODS[args.method].vfm)
                        if args.method in METHODS else None)


# ---------------------------------------------------------------------------------------------------------------
# The page

def shares_html(summary: Dict) -> str:
    """The JSON's classes (largest first) as a table: colour swatch, name, share bar, percentage, pixels."""
    rows = []
    for c in summary["classes"]:
        r, g, b = c["color"]
        pct = 100.0 * c["share"]
        rows.append(
            f'<tr><td><span class="swatch" style="background: rgb({r},{g},{b})"></span></td>'
            f'<td class="name">{html.escape(c["name"])}</td>'
            f'<td class="bar"><span style="width: {pct:.1f}%"></span></td>'
            f'<td class="pct">{pct:.1f}%</td><td class="px">{c["pixels"]:,}</td></tr>')
    return ('<table class="shares"><caption>Pixel shares</caption><thead><tr><th></th><th>class</th>'
            '<th>share of the pixels</th><th></th><th>pixels</th></tr></thead><tbody>' + "".join(rows)
            + "</tbody></table>")


def model_line(seg: WebSegmenter) -> str:
    if not seg.has_centers:
        second = f" with the second vision model `{seg.vfm_weights}`" if seg.vfm_weights else ""
        return (f"Model: `--method {seg.method}`, the plain CLIP `{seg.weights}`{second} on {seg.device} "
                "(training-free: no learnable centers, so no center view).")
    cfg = seg.model.config
    where = f"`{seg.checkpoint}` on {seg.device}"
    if seg.released:
        return f"Model: the released SegCLIP checkpoint {where}."
    return (f"Model: {where} — **not the released SegCLIP checkpoint** (width {cfg.vision_width}, "
            f"{cfg.vision_layers} visual layers); results show what this checkpoint learned.")


def error_md(message: str) -> str:
    """A message for the status line; page messages are sentences, so they end with a full stop."""
    message = message.rstrip()
    if not message.endswith((".", "!", "?")):
        message += "."
    return f'<span class="error-status">⚠ {html.escape(message)}</span>'


def internal_error(doing: str, e: BaseException) -> str:
    """What the page says when a request fails for a reason that is not the user's (a bug, memory): the kind of
    error, and where the details are. The traceback goes to the server's log, not to the page."""
    logger.error("the page failed to %s", doing, exc_info=e)
    if isinstance(e, MemoryError):
        return f"Could not {doing}: the server ran out of memory; try a smaller photo or fewer class names"
    return (f"Could not {doing}: an internal error ({type(e).__name__}) that is not caused by your input; "
            "the server's log has the details")


CSS = """
#status { min-height: 1.5em; }
.error-status { color: #b91c1c; font-weight: 600; }
table.shares { width: 100%; border-collapse: collapse; font-size: 0.95em; border: none !important; }
table.shares caption { caption-side: top; text-align: left; font-weight: 600; padding: 0 6px 4px; }
table.shares tr, table.shares th, table.shares td { border: none !important; padding: 3px 6px !important; }
table.shares th { text-align: left; font-weight: 600; border-bottom: 1px solid #ccc !important; }
table.shares td { border-bottom: 1px solid #eee !important; }
table.shares .swatch { display: inline-block; width: 1.1em; height: 1.1em; border: 1px solid #555; border-radius: 3px;
                       vertical-align: middle; }
table.shares td.bar { width: 45%; }
table.shares td.bar span { display: block; height: 0.8em; background: #6366f1; border-radius: 2px; min-width: 1px; }
table.shares td.pct, table.shares td.px { text-align: right; font-variant-numeric: tabular-nums; }
"""


def refuse_remote_files(component) -> None:
    """The page fetches nothing. Gradio downloads a file input that a client of its API gives as an http(s) URL
    instead of an upload (into its cache, from any public host); the photo box refuses such a URL before any
    connection is made. Uploads and local example files go through unchanged."""
    import gradio as gr
    from gradio_client.utils import is_http_url_like

    def refuse(path):
        if path is not None and is_http_url_like(str(path)):
            raise gr.Error("This page does not fetch photos from the internet; upload the file instead.")

    to_cache, to_cache_async = component.move_resource_to_block_cache, component.async_move_resource_to_block_cache

    def move_resource_to_block_cache(url_or_file_path):
        refuse(url_or_file_path)
        return to_cache(url_or_file_path)

    async def async_move_resource_to_block_cache(url_or_file_path):
        refuse(url_or_file_path)
        return await to_cache_async(url_or_file_path)

    component.move_resource_to_block_cache = move_resource_to_block_cache
    component.async_move_resource_to_block_cache = async_move_resource_to_block_cache


def build_page(seg: WebSegmenter, examples_dir: Path = EXAMPLES_DIR, max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB):
    import gradio as gr
    import numpy as np

    from common.images import read_image_bgr
    from seg_segmentation.classes import name_token_limit
    from seg_segmentation.templates import TEMPLATES

    def preview(photo):
        """The uploaded file as the reader used for inference decodes it (so an unreadable file is named now)."""
        if not photo:
            return None, ""
        try:
            bgr = read_image_bgr(Path(photo), seg.max_image_pixels)
            h, w = bgr.shape[:2]
            step = max(1, int(np.ceil(max(h, w) / PREVIEW_SIDE)))
            return np.ascontiguousarray(bgr[::step, ::step, ::-1]), f"{Path(photo).name}: {w}×{h} pixels"
        except SegCLIPError as e:
            return None, error_md(str(e).replace(str(photo), Path(photo).name))
        except Exception as e:   # a bug: the page says so, the server's log has the traceback
            return None, error_md(internal_error("read the photo", e))

    def run(photo, classes, background, bg_thresh, templates):
        try:
            return show(photo, seg.segment(photo, classes, background, bg_thresh, templates))
        except SegCLIPError as e:       # the page's own checks and every user error raised deeper (UsageError ...)
            return None, None, "", None, error_md(f"Could not segment: {e}")
        except Exception as e:          # a bug: never gradio's bare "Error"
            return None, None, "", None, error_md(internal_error("segment", e))

    def show(photo, r):
        """A result -> the page's outputs: overlay, center map, shares table, downloads, status line."""
        s = r["summary"]
        status = (f"Segmented **{html.escape(Path(photo).name)}** ({s['width']}×{s['height']}) with "
                  f"{len(s['vocabulary'])} labels in {r['seconds']:.2f} s on {seg.device}.")
        groups = str(r["groups"]) if r["groups"] is not None else None
        return (str(r["overlay"]), groups, shares_html(s), [str(r["label_png"]), str(r["json"])], status)

    examples = []
    for jpg in sorted(examples_dir.glob("*.jpg")):
        txt = jpg.with_suffix(".txt")
        examples.append([str(jpg), example_class_names(txt) if txt.is_file() else ""])

    title = "SegCLIP" if seg.method == "segclip" else f"{seg.method.upper()} (training-free CLIP)"
    pixels = (f"at most {seg.max_image_pixels / 1e6:.1f} megapixels, " if seg.max_image_pixels else "")
    with gr.Blocks(title="SegCLIP web demo", analytics_enabled=False,
                   delete_cache=(CACHE_SWEEP_S, CACHE_AGE_S)) as page:
        gr.Markdown(f"## {title}: segment a photo with your own words\n" + model_line(seg))
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                photo = gr.File(label=f"Photo (drop an image file here or click to upload; {pixels}"
                                      f"{max_upload_mb} MB)", file_types=["image"],
                                type="filepath", elem_id="photo", height=110)
                refuse_remote_files(photo)
                shown = gr.Image(label="Your photo", interactive=False, elem_id="preview", height=260,
                                 buttons=[])
                classes = gr.Textbox(label="Class names, comma separated", placeholder="cat, wall, floor",
                                     lines=1, max_lines=10, elem_id="classes",
                                     info="or one class per line with its synonyms after commas, as in a "
                                          "--classes_file (\"cat, kitten\"); Shift+Enter starts a new line. At "
                                          f"most {MAX_PAGE_NAMES} names, each at most {name_token_limit()} CLIP "
                                          "tokens long")
                with gr.Row():
                    background = gr.Checkbox(value=True, label="background", elem_id="background",
                                             info="label pixels no class is sure of as background")
                    # sclip / clip name background by the word 'background' and --prob_thd, not by a threshold
                    bg_thresh = gr.Slider(0.0, 1.0, value=DEFAULT_BG_THRESH, step=0.01, elem_id="bg_thresh",
                                          label="background threshold", info="higher = more background",
                                          visible=seg.has_centers)
                templates = gr.Dropdown(sorted(TEMPLATES), value=seg.templates, label="prompt templates",
                                        elem_id="templates")
                go = gr.Button("Segment", variant="primary", elem_id="segment")
                gr.Examples(examples, inputs=[photo, classes], label="Examples (demo/examples)",
                            example_labels=[Path(e[0]).stem + ": " + e[1] for e in examples])
            with gr.Column(scale=3, min_width=420):
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    overlay = gr.Image(label="Labels", interactive=False, elem_id="overlay", buttons=["fullscreen"],
                                       height=340)
                    groups = gr.Image(label=f"Center assignment ({seg.model.config.num_centers} centers)"
                                      if seg.has_centers else "Center assignment", visible=seg.has_centers,
                                      interactive=False, elem_id="groups", buttons=["fullscreen"], height=340)
                shares = gr.HTML(elem_id="shares", label="Pixel shares")
                files = gr.File(label="Download: label PNG (pixel = label id) and JSON", file_count="multiple",
                                interactive=False, elem_id="downloads")
        photo.change(preview, inputs=photo, outputs=[shown, status])
        background.change(lambda on: gr.update(interactive=on), inputs=background, outputs=bg_thresh)
        # Segment and Enter in the names box share one queue: requests are answered in order, one at a time
        gr.on([go.click, classes.submit], run, inputs=[photo, classes, background, bg_thresh, templates],
              outputs=[overlay, groups, shares, files, status], concurrency_limit=1, concurrency_id="segment")
    return page


def offline_theme():
    """Gradio's look with local fonts: the default theme would fetch Google fonts, which offline machines lack."""
    import gradio as gr
    return gr.themes.Default(primary_hue="indigo", font=["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
                             font_mono=["ui-monospace", "Menlo", "Consolas", "monospace"])


def check_port(host: str, port: int) -> None:
    """Fail before the model is loaded when the address cannot be served (port taken, unknown host)."""
    import socket
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server does: TIME_WAIT is no obstacle
            s.bind((host, port))
    except OSError as e:
        raise DemoSetupError(f"cannot serve on {host}:{port} ({e.strerror or e}); choose another --port "
                             f"(or --host)") from None


@cli.run_main
def main(argv=None) -> int:
    args = get_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # read when gradio is imported: no calls home
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise DemoSetupError("the web demo needs gradio: pip install -r requirements-demo.txt") from None
    check_port(args.host, args.port)
    seg = load_segmenter(args)
    print(f"{model_line(seg).replace('**', '').replace('`', '')}\nServing on http://{args.host}:{args.port}",
          flush=True)
    # a terminated server (SIGTERM, as from a service manager) removes its result folder like Ctrl-C does
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        launch_page(build_page(seg, max_upload_mb=args.max_upload_mb), args.host, args.port, args.max_upload_mb)
    finally:
        seg.close()
    return 0


def launch_page(page, host: str, port: int, max_upload_mb: int, block: bool = True) -> None:
    """Serve ``page`` (``block`` False: in a background thread, for tests; ``page.close()`` stops it). Uploads
    above ``max_upload_mb`` are refused by the server (HTTP 413) before they reach the disk."""
    page.launch(server_name=host, server_port=port, theme=offline_theme(), css=CSS, ssr_mode=False,
                show_error=False, quiet=True, footer_links=["gradio", "settings"],
                max_file_size=max_upload_mb * 1_000_000, prevent_thread_lock=not block)


if __name__ == "__main__":
    sys.exit(main())
