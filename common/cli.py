"""The command-line layer of every script (``main_*.py``, ``preprocess/*.py``): one parser class, the shared flag
groups, settings files, input checks before heavy work, and the wrapper that turns user errors into one line.

A script builds ``p = make_parser(__doc__)``, adds its flags and the groups it needs (``add_checkpoint_args``,
``add_vocabulary_args``, ``add_window_args``, ``add_runtime_args``), reads them with ``args = parse(p, argv)`` and
decorates its ``main`` with :func:`run_main`. Then, in every script alike:

- flags are never abbreviated (``--bg_t`` is an error, not ``--bg_thresh``);
- ``--cfg FILE`` reads settings from YAML/JSON (plain values only: ``yaml.safe_load``) and ``--opts KEY VALUE ...``
  overrides them; each value is checked against its flag's type and choices, and an error names the setting;
- a bad flag or value, and every :class:`~common.errors.SegCLIPError` raised later, ends the script with one line
  ``error: ...`` on stderr and exit status 2, printed by rank 0 only under ``torchrun``;
- ``--help`` shows each default once.
"""
import argparse
import contextlib
import errno
import functools
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import yaml

from common.errors import SegCLIPError, UsageError
from common.images import DEFAULT_MAX_IMAGE_PIXELS
from common.ranks import is_rank_zero

# --cfg / --opts keys of the 2022 configs (GroupViT-style ``default.yml``) -> our flag names; None = accepted and
# ignored (settings of the 2022 training framework that have no meaning here). Scripts may add their own.
LEGACY_SETTINGS: Dict[str, Optional[str]] = {
    "template": "templates", "img_size": "resolution", "local_rank": None, "mode": None, "cfg": None,
    "save_best": None, "task": None, "eval_only": None, "eval_freq": None, "opts": None, "output": None,
    "tag": None, "model_name": None, "amp_opt_level": None, "vis": None,
}
AMP_CHOICES = ("off", "bf16", "fp16")
SILENT_RANK_EXIT_DELAY_S = 2.0
PAPER_SEED = 42    # the seed of the published training run (design.md §5), the default of every --seed
_NOT_SETTINGS = ("help", "cfg", "opts")


# ---------------------------------------------------------------------------------------------- parser
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; appends ``(default: X)`` once, and only where the help text does not
    already say what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text.lower() or default is None or default is False
                or default == argparse.SUPPRESS or action.nargs == 0):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that never abbreviates flags and raises UsageError instead of printing usage + exiting,
    so that :func:`run_main` reports it like every other user error (one line, rank 0 only, exit status 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def make_parser(description: Optional[str] = None, config: bool = True, **kwargs) -> Parser:
    """The parser of a script; ``config`` adds ``--cfg`` / ``--opts`` (read by :func:`parse`)."""
    p = Parser(description=description, **kwargs)
    if config:
        g = p.add_argument_group("settings files")
        g.add_argument("--cfg", default=None, metavar="FILE",
                       help="YAML or JSON file of settings: keys are the flag names without dashes (nested 2022 "
                            "configs are flattened); flags typed on the command line win over it")
        g.add_argument("--opts", nargs="+", default=None, metavar="KEY VALUE",
                       help="settings that override --cfg and the flags: KEY VALUE pairs or KEY=VALUE, "
                            "e.g. --opts bg_thresh 0.7")
    return p


# ---------------------------------------------------------------------------------------------- flag groups
def add_checkpoint_args(p: argparse.ArgumentParser, *, init_model_help: str, clip_help: Optional[str] = None,
                        first_stage_layer: Optional[int] = 10, first_stage_help: Optional[str] = None):
    """``--init_model``, ``--pretrained_clip_name`` (when ``clip_help``), ``--cache_dir``, ``--first_stage_layer``."""
    g = p.add_argument_group("checkpoint and model")
    g.add_argument("--init_model", default=None, metavar="FILE", help=init_model_help)
    if clip_help is not None:
        g.add_argument("--pretrained_clip_name", default="ViT-B/16", metavar="NAME_OR_FILE", help=clip_help)
    g.add_argument("--cache_dir", default=None, metavar="DIR",
                   help="folder of downloaded weights (default: $SEGCLIP_CACHE, else checkpoints/)")
    if first_stage_help is None:       # None: the checkpoint carries the value (the 2022 flag is only checked)
        first_stage_help = ("visual blocks before the learnable centers" if first_stage_layer is not None else
                            "accepted for 2022 command lines: the value is read from the checkpoint, and this "
                            "only checks that it matches")
    g.add_argument("--first_stage_layer", type=int, default=first_stage_layer, help=first_stage_help)
    return g


def add_vocabulary_args(p: argparse.ArgumentParser, *, datasets: Sequence[str], templates: Sequence[str],
                        dataset_default: str, dataset_help: str, bg_thresh_help: str, names_help: str,
                        no_bg: bool = False, several: bool = False):
    """``--dataset``, ``--classes``, ``--classes_file`` / ``--class_names`` (one flag, two spellings),
    ``--templates``, ``--bg_thresh`` and optionally ``--no_bg``; ``several``: ``--dataset`` takes a comma-separated
    list (see :func:`method_list`). The names are read by
    ``seg_segmentation.classes.parse_class_list`` / ``read_class_file``, the same way in every script."""
    g = p.add_argument_group("vocabulary")
    if several:   # a comma-separated list, checked by check_choices
        g.add_argument("--dataset", default=dataset_default, metavar="{" + ",".join(datasets) + "},...",
                       help=dataset_help)
    else:
        g.add_argument("--dataset", default=dataset_default, choices=list(datasets), help=dataset_help)
    g.add_argument("--classes", default=None, metavar="'A, B, C'",
                   help="your own class names, comma separated, e.g. \"cat, dog, sky\" (replaces the dataset's)")
    g.add_argument("--classes_file", "--class_names", dest="classes_file", default=None, metavar="FILE",
                   help=names_help + "; one class name per line, blank lines and lines starting with '#' ignored")
    g.add_argument("--templates", "--template", dest="templates", default=None, choices=sorted(templates),
                   help="prompts averaged per class: simple = 'a photo of a {}.', subset = 7 and full = 80 "
                        "ImageNet prompts, identity = the bare name")
    g.add_argument("--bg_thresh", type=float, default=None, help=bg_thresh_help)
    if no_bg:
        g.add_argument("--no_bg", action="store_true",
                       help="no background class: every pixel gets one of the classes")
    return g


def add_window_args(p: argparse.ArgumentParser, *, max_long: bool = True):
    """The evaluation protocol's resize and sliding window: ``--resolution``, ``--max_long``, ``--crop_size``,
    ``--stride`` (design.md §7.3). Check them with :func:`check_window`."""
    g = p.add_argument_group("resize and sliding window (design.md §7.3)")
    g.add_argument("--resolution", type=int, default=224,
                   help="short side of the keep-ratio resize before inference; outputs keep the image's size")
    if max_long:
        g.add_argument("--max_long", type=int, default=2048, help="cap on the long side of that resize")
    g.add_argument("--crop_size", type=int, default=224, help="sliding-window size in pixels")
    g.add_argument("--stride", type=int, default=224, help="sliding-window stride in pixels")
    return g


SEGCLIP = "segclip"
SEGCLIP_WINDOW = dict(resolution=224, crop=224, stride=224, templates="simple")   # design.md §7.3
# a flag of add_method_args -> the setting it gives (TrainingFreeMethod.settings' names)
PROTOCOL_FLAGS = {"resolution": "resolution", "crop_size": "crop", "stride": "stride", "templates": "templates",
                  "logit_scale": "logit_scale", "prob_thd": "prob_thd", "area_thd": "area_thd",
                  "pamr_steps": "pamr_steps", "pamr_dilations": "pamr_dilations"}
_HEAD_FLAGS = ("logit_scale", "prob_thd", "area_thd", "clip_activation")   # training-free methods only


def area_thd_setting(value: str) -> float:
    """--area_thd: a fraction in [0, 1), or 'none' -> 0.0 (off: zeroing classes of no area changes no label)."""
    if str(value).strip().lower() in ("none", "off"):
        return 0.0
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1) or 'none', got {value!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1) or 'none', got {value!r}")
    return v


def method_list(value: str) -> List[str]:
    """``--method a,b`` / ``--dataset x,y`` -> ['a', 'b'] (order kept, repeats dropped)."""
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    return list(dict.fromkeys(items))


def add_method_args(p: argparse.ArgumentParser, methods: Mapping, several: bool = False):
    """``--method``, the training-free head's settings and every method's own knobs (design.md §13).

    ``methods``: name -> ``TrainingFreeMethod`` subclass (``seg_segmentation.methods.METHODS``; passed in, since
    this layer imports nothing above it). ``several``: ``--method`` takes a comma-separated list. The protocol
    flags (``--resolution``, ``--crop_size``, ``--stride``, ``--templates`` and the head's) default to None: each
    method's preset for the dataset fills what is not given (``seg_segmentation.dense.resolve_settings``), so a
    flag typed on the command line always wins."""
    names = [SEGCLIP] + list(methods)
    g = p.add_argument_group("method (design.md §12, §13)")
    listing = "; ".join(f"{n}: {cls.summary}" for n, cls in methods.items())
    g.add_argument("--method", default=SEGCLIP, metavar="{" + ",".join(names) + "}" + (",..." if several else ""),
                   help="segclip: the SegCLIP checkpoint (--init_model). Training-free, on the CLIP of "
                        f"--pretrained_clip_name: {listing}. Each defaults to its published settings for --dataset "
                        "and to the project's synonym class names" +
                        ("; a comma-separated list evaluates every method on every --dataset" if several else ""))
    g.add_argument("--logit_scale", type=float, default=None,
                   help="training-free: scale of the cosine similarities before the softmax over names (default: "
                        "the method's preset for --dataset)")
    g.add_argument("--prob_thd", type=float, default=None,
                   help="training-free: pixels whose best class probability is below it become class 0 "
                        "(default: the method's preset)")
    g.add_argument("--area_thd", type=area_thd_setting, default=None, metavar="{NUMBER,none}",
                   help="training-free: foreground classes covering at most this fraction of the foreground are "
                        "dropped; none = off (default: the method's preset; only sclip / clip on voc use one)")
    g.add_argument("--pamr_steps", type=int, default=None,
                   help="PAMR refinement steps at the original size, any method; 0 = off (default: the method's "
                        "preset, 0 for every method: the published main tables have no PAMR)")
    g.add_argument("--pamr_dilations", type=int, nargs="+", default=None, metavar="D",
                   help="PAMR neighbourhood distances in pixels (default: 8 16)")
    g.add_argument("--clip_activation", default=None, choices=["quick_gelu", "gelu"],
                   help="training-free: the MLP activation of --pretrained_clip_name when the file does not say "
                        "(open_clip checkpoints; default quick_gelu, OpenAI's; a transformers config.json says it)")
    vfm_users = [n for n, cls in methods.items() if cls.vfm]
    if vfm_users:
        g.add_argument("--vfm", default=None, metavar="NAME_OR_FILE",
                       help=f"{', '.join(vfm_users)}: the second vision model, DINO or DINOv2. A name - dino_vits8, "
                            "dino_vits16, dino_vitb8, dino_vitb16, dinov2_vit{s,b,l,g}14 and each dinov2 one with "
                            "_reg (registers) - is the official file from dl.fbaipublicfiles.com, downloaded into "
                            "--cache_dir when missing (offline: put it there; docs/evaluation.md); or a checkpoint "
                            "file in the official DINO / DINOv2 layout, read weights-only (default: the method's, "
                            + ", ".join(f"{n} {methods[n].vfm}" for n in vfm_users) + ")")
    knobs: Dict[str, list] = {}
    for n, cls in methods.items():
        for knob in cls.knobs:
            knobs.setdefault(knob.name, []).append((n, knob))
    if knobs:
        k = p.add_argument_group("settings of single methods (default: the method's preset for --dataset)")
        for name, users in knobs.items():
            knob = users[0][1]
            clash = [n for n, kb in users if (kb.type, kb.choices) != (knob.type, knob.choices)]
            if clash:   # one flag per name: methods sharing a knob name must mean the same kind of value
                raise ValueError(f"knob {name!r} of {users[0][0]} and {clash[0]} differ in type or choices; "
                                 "rename one (prefix it with its method's name)")
            kind = _knob_type(knob.type)
            helps = "; ".join(f"{n}: {kb.help}" for n, kb in users)
            defaults = {n: kb.default for n, kb in users}
            helps += (f" (default {knob.default})" if len(set(map(repr, defaults.values()))) == 1 else
                      " (default: " + ", ".join(f"{n} {d}" for n, d in defaults.items()) + ")")
            k.add_argument(f"--{name}", type=kind, default=None, choices=knob.choices, help=helps,
                           metavar="{true,false}" if knob.type is bool else None)
    p.set_defaults(resolution=None, crop_size=None, stride=None, templates=None, _method_knobs=tuple(knobs),
                   _several_methods=several)
    for action in p._actions:
        if action.dest in ("resolution", "crop_size", "stride", "templates"):
            action.help += " (default: the method's preset for --dataset; SegCLIP: 224 / 224 / 224 / simple)"
        if action.dest == "crop_size":
            action.help += "; 0 = the whole image in one pass"
    return g


def _knob_type(t):
    if t is bool:
        def boolean(value):
            v = str(value).strip().lower()
            if v in ("1", "true", "yes", "on"):
                return True
            if v in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
        boolean.__name__ = "true/false"
        return boolean
    return t


def check_method(args, methods: Mapping) -> None:
    """--method's flags: known methods, PAMR settings sane, training-free flags not given to SegCLIP alone, knobs
    only for a method that has them."""
    chosen = method_list(args.method)
    if not chosen:
        raise UsageError("--method: give a method name")
    if len(chosen) > 1 and not getattr(args, "_several_methods", False):
        raise UsageError(f"--method {args.method}: give one method here")
    unknown = [m for m in chosen if m != SEGCLIP and m not in methods]
    if unknown:
        raise UsageError(f"--method {unknown[0]}: unknown; choose from {', '.join([SEGCLIP] + list(methods))}")
    if args.pamr_steps is not None and args.pamr_steps < 0:
        raise UsageError(f"--pamr_steps must be >= 0, got {args.pamr_steps}")
    if args.pamr_dilations is not None and any(d < 1 for d in args.pamr_dilations):
        raise UsageError(f"--pamr_dilations must be positive, got {args.pamr_dilations}")
    free = [m for m in chosen if m != SEGCLIP]
    if not free:
        given = [f"--{n}" for n in _HEAD_FLAGS + tuple(getattr(args, "_method_knobs", ())) + ("vfm",)
                 if getattr(args, n, None) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} apply to the training-free methods only, not --method segclip")
    for name in getattr(args, "_method_knobs", ()):
        if getattr(args, name) is not None and not any(name in {k.name for k in methods[m].knobs} for m in free):
            users = [m for m, cls in methods.items() if name in {k.name for k in cls.knobs}]
            raise UsageError(f"--{name} is a setting of {', '.join(users)}, not of --method {args.method}")
    if getattr(args, "vfm", None) is not None and not any(methods[m].vfm for m in free):
        users = [m for m, cls in methods.items() if cls.vfm]
        raise UsageError(f"--vfm is the second vision model of {', '.join(users)}, not of --method {args.method}")
    if getattr(args, "vfm", None) is not None:
        from common.download import VFM_URLS
        if args.vfm not in VFM_URLS and not os.path.isfile(args.vfm):
            what = "is a folder, not a checkpoint file" if os.path.isdir(args.vfm) else \
                "is neither a checkpoint file nor one of the known models"
            raise UsageError(f"--vfm {args.vfm} {what} ({', '.join(VFM_URLS)})")
    if args.logit_scale is not None and not 0 < args.logit_scale < float("inf"):
        raise UsageError(f"--logit_scale must be a positive number, got {args.logit_scale}")
    if args.prob_thd is not None and not 0.0 <= args.prob_thd <= 1.0:
        raise UsageError(f"--prob_thd must be in [0, 1], got {args.prob_thd}")


def amp_setting(value: str) -> str:
    """``--amp`` value: off / none (the same: float32) / bf16 / fp16 -> 'off', 'bf16' or 'fp16'."""
    v = str(value).strip().lower()
    v = "off" if v in ("none", "fp32", "float32") else v
    if v not in AMP_CHOICES:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of off, none, bf16, fp16")
    return v


def add_inference_args(p: argparse.ArgumentParser, *, precisions: Sequence[str]):
    """``--precision`` (one of ``precisions``: modules/precision.py) and ``--max_image_pixels`` (common/images.py):
    the demo's and the evaluation's."""
    g = p.add_argument_group("inference")
    g.add_argument("--precision", default="fp32", choices=list(precisions),
                   help="weights and matrix products in float32 (the published numbers) or bfloat16 (LayerNorm, "
                        "softmax and the zero-shot head in float32; faster where the CPU or GPU has bf16 units; "
                        "docs/evaluation.md gives its agreement with fp32)")
    g.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="refuse images with more pixels, read from the file header before anything is decoded "
                        "(decompression bombs); 0 = no limit. Pillow's limit")
    return g


DEMO_CLIP_HELP = ("CLIP weights of --method sclip / clip: a name (ViT-B/16, downloaded when missing), an OpenAI / "
                  "open_clip / .safetensors file or a Hugging Face CLIP folder (ignored with SegCLIP)")


def add_segmenter_args(p: argparse.ArgumentParser, *, init_model_help: str, precisions: Sequence[str],
                       methods: Mapping, clip_help: str = DEMO_CLIP_HELP, max_long: bool = True, several: bool = False,
                       **checkpoint_kwargs):
    """The flags of every tool that segments images with a chosen method (demo, web page, evaluation): checkpoint
    and CLIP weights, sliding windows, the method, its head and knobs, precision and the pixel limit."""
    add_checkpoint_args(p, init_model_help=init_model_help, clip_help=clip_help, **checkpoint_kwargs)
    add_window_args(p, max_long=max_long)
    add_method_args(p, methods, several=several)
    add_inference_args(p, precisions=precisions)


def check_segmenter_args(args, methods: Mapping) -> None:
    """The checks of ``add_segmenter_args``' flags (and the vocabulary's, where the tool has them), before any model
    is loaded. Protocol flags left unset stay None: the method's preset fills them per dataset."""
    if getattr(args, "classes", None) is not None and getattr(args, "classes_file", None) is not None:
        raise UsageError("give --classes or --classes_file, not both")
    if hasattr(args, "bg_thresh"):
        check_bg_thresh(args)
    check_method(args, methods)
    check_window(args)
    for method in method_list(args.method):       # a stride given against the presets' crops, or the reverse
        for dataset in method_list(getattr(args, "dataset", None) or "voc"):
            preset = SEGCLIP_WINDOW if method == SEGCLIP else methods[method].settings(dataset)
            check_stride(preset["crop"] if args.crop_size is None else args.crop_size,
                         preset["stride"] if args.stride is None else args.stride)
    check_max_image_pixels(args)


def check_max_image_pixels(args) -> None:
    if args.max_image_pixels < 0:
        raise UsageError(f"--max_image_pixels must be >= 0 (0 = no limit), got {args.max_image_pixels}")


def add_runtime_args(p: argparse.ArgumentParser, *, amp_help: Optional[str] = None, distributed: bool = True,
                     device_help: Optional[str] = None):
    """``--device``, ``--amp`` (when ``amp_help``), ``--no_progress`` and the launchers' ``--local_rank`` /
    ``--local-rank`` and ``--dist_backend``."""
    g = p.add_argument_group("runtime and device")
    g.add_argument("--device", default=None,
                   help=device_help or "cpu, cuda or cuda:N (default: cuda when available, else cpu); under a "
                                       "launcher each process uses cuda:LOCAL_RANK")
    if amp_help is not None:
        g.add_argument("--amp", type=amp_setting, default="off", metavar="{off,none,bf16,fp16}",
                       help=amp_help + "; off and none both mean float32")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    if distributed:
        g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                       help="set by torch.distributed.launch; LOCAL_RANK from torchrun is used when absent")
        g.add_argument("--dist_backend", default=None, choices=["nccl", "gloo"],
                       help="process-group backend (default: nccl on CUDA, gloo on CPU)")
    return g


def add_batch_job_args(p: argparse.ArgumentParser, what: str = "images"):
    """``--workers``, ``--max_samples``, ``--no_progress``: the same in every preprocessing script."""
    g = p.add_argument_group("processing")
    g.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                   help="worker processes (0 = all in this process). Default: CPU count - 1")
    g.add_argument("--max_samples", type=int, default=None,
                   help=f"stop after writing this many new {what} (testing; rerun to resume)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    return g


def run_batch_job(build: Callable[..., Mapping], **kwargs) -> int:
    """Run a preprocessing builder with logging on, and print its counts as one machine-readable
    ``SUMMARY {json}`` line on stdout."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print("SUMMARY " + json.dumps(build(**kwargs)), flush=True)
    return 0


def add_legacy_flags(p: argparse.ArgumentParser, flags: Mapping[str, dict], what: str) -> None:
    """2022 flags that have no effect here, accepted so old command lines run; :func:`ignored_flags` names the ones
    given (the script prints one note)."""
    g = p.add_argument_group("2022 flags without effect here")
    for flag, kw in flags.items():
        g.add_argument(flag, default=None, help=f"accepted for 2022 command lines and ignored: {what}", **kw)
    p.set_defaults(_legacy_flags=tuple(flags))


def ignored_flags(args) -> List[str]:
    return [f for f in getattr(args, "_legacy_flags", ()) if getattr(args, f.lstrip("-")) is not None]


def note_ignored_flags(args) -> None:
    """One ``note:`` line on stderr (rank 0) naming the 2022 flags given that have no effect."""
    ignored = ignored_flags(args)
    if ignored and is_rank_zero():
        print(f"note: {', '.join(ignored)} ignored (2022 flags without effect here)", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- --cfg / --opts
def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
          aliases: Optional[Mapping[str, Optional[str]]] = None) -> argparse.Namespace:
    """Parse ``argv`` with ``--cfg``'s settings as the defaults (so flags typed on the command line win, and a
    required flag may come from the file), then apply ``--opts`` on top. ``aliases``: extra setting names -> flag
    names (None: accepted and ignored), on top of LEGACY_SETTINGS."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = dict(LEGACY_SETTINGS, **(aliases or {}))
    actions = {a.dest: a for a in parser._actions}
    if "cfg" in actions:
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--cfg", default=None)
        cfg = pre.parse_known_args(argv)[0].cfg
        if cfg:
            values = settings_values(parser, flatten(load_settings_file(cfg)), f"--cfg {cfg}", names)
            for dest, value in values.items():
                actions[dest].required = False
            parser.set_defaults(**values)
    args = parser.parse_args(argv)
    if getattr(args, "opts", None):
        for dest, value in settings_values(parser, parse_opts(args.opts), "--opts", names, prefer_flags=True).items():
            setattr(args, dest, value)
    return args


def load_settings_file(path: str) -> dict:
    """A YAML/JSON mapping of settings, read with ``yaml.safe_load`` (no tags that build Python objects)."""
    if not os.path.isfile(path):
        raise UsageError(f"--cfg {path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.constructor.ConstructorError as e:
        where = f" (line {e.problem_mark.line + 1})" if e.problem_mark is not None else ""
        raise UsageError(f"--cfg {path}{where}: {e.problem}; a settings file holds plain values (numbers, "
                         "strings, lists), no tags such as !!python/...") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UsageError(f"--cfg {path}{where}: not valid YAML/JSON: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--cfg {path}: cannot read it ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--cfg {path}: expected a mapping of settings (key: value), got a {type(data).__name__}")
    return data


def flatten(d: Mapping, out: Optional[dict] = None) -> dict:
    """Nested 2022 configs (``evaluate: {seg: {template: ...}}``) -> one level (``template: ...``)."""
    out = {} if out is None else out
    for k, v in d.items():
        if isinstance(v, Mapping):
            flatten(v, out)
        else:
            out[str(k)] = v
    return out


def parse_opts(items: Sequence[str]) -> dict:
    """``['bg_thresh', '0.7', 'stride=56']`` -> ``{'bg_thresh': '0.7', 'stride': '56'}``."""
    pairs, rest = {}, list(items)
    while rest:
        item = rest.pop(0)
        if "=" in item:
            key, value = item.split("=", 1)
        elif rest:
            key, value = item, rest.pop(0)
        else:
            raise UsageError(f"--opts: setting {item!r} has no value (give KEY VALUE or KEY=VALUE)")
        pairs[key] = value
    return pairs


def settings_values(parser: argparse.ArgumentParser, settings: Mapping, source: str,
                    names: Mapping[str, Optional[str]], prefer_flags: bool = False) -> dict:
    """{setting: value} from a file or --opts -> {flag destination: value converted and checked like the flag}."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in _NOT_SETTINGS}
    out = {}
    for raw_key, value in settings.items():
        key = str(raw_key).split(".")[-1].replace("-", "_")
        if key not in actions and key.lower() in actions:
            key = key.lower()
        # in a settings file, a 2022 key means what it meant in 2022 (e.g. 'output' was a folder, not our JSON
        # file); typed after --opts, a flag's own name comes first
        if key in names and (not prefer_flags or key not in actions):
            key = names[key]
            if key is None:
                continue
        if key not in actions:
            raise UsageError(f"{source}: unknown setting {raw_key!r}; settings are the flag names of --help "
                             "without the dashes")
        action = actions[key]
        if isinstance(action.nargs, str) and action.nargs in "+*" and value in (None, [], ""):
            continue   # an empty list in a 2022 config (e.g. ``vis: []``) means 'not set'
        out[key] = coerce_setting(action, value, source, key)
    return out


def _type_name(t) -> str:
    return {int: "an integer", float: "a number", str: "a string"}.get(t, "a valid value")


def coerce_setting(action: argparse.Action, value, source: str, key: str):
    """A value from a settings file or --opts, converted and checked as the flag ``action`` would."""
    flag = action.option_strings[0]

    def bad(what: str):
        return UsageError(f"{source}: {key} {value!r} is not {what} (the setting of {flag})")

    if action.nargs == 0:                         # store_true / store_false / store_const
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            value = value.strip().lower() in ("1", "true", "yes", "on")
        if not isinstance(value, bool):
            raise bad("true or false")
        if isinstance(action.const, bool) or action.const is None:
            return value
        return action.const if value else action.default
    if value is None:
        if action.default is None:
            return None
        raise bad(_type_name(action.type))
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            items = [items]
        return [_coerce_scalar(action, v, bad) for v in items]
    if isinstance(value, (list, tuple, dict)):
        raise bad(_type_name(action.type))
    return _coerce_scalar(action, value, bad)


def _coerce_scalar(action: argparse.Action, value, bad: Callable[[str], Exception]):
    t = action.type
    if isinstance(value, bool) and t is not None:
        raise bad(_type_name(t))
    try:
        if t is None:
            value = str(value)
        elif t is float and isinstance(value, (int, float)):
            value = float(value)
        elif t is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError
            value = int(value)
        else:
            value = t(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise bad(_type_name(t)) from None
    if action.choices is not None and value not in action.choices:
        raise bad("one of " + ", ".join(map(str, action.choices)))
    return value


# ---------------------------------------------------------------------------------------------- input checks
def check_positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:          # written so that NaN fails too
            raise UsageError(f"--{name} must be positive, got {value}")


def check_number(args, name: str, low: float = -math.inf, high: float = math.inf, high_open: bool = False) -> None:
    """--name (when given) is a finite number in [low, high] ([low, high) with ``high_open``). NaN and infinities
    are refused: they pass no check written as 'refuse below low' and would reach the optimiser or the model."""
    value = getattr(args, name)
    if value is None:
        return
    inside = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not inside:
        if math.isinf(low) and math.isinf(high):
            want = "a finite number"
        elif math.isinf(high):
            want = f"a finite number >= {low:g}"
        else:
            want = f"a number in [{low:g}, {high:g}{')' if high_open else ']'}"
        raise UsageError(f"--{name} must be {want}, got {value}")


def check_window(args) -> None:
    """--resolution, --stride, --max_long positive, --crop_size >= 0 (0 = whole image); a stride above the window
    leaves gaps. Unset (None) values are the method's preset, checked there."""
    check_positive(args, *[n for n in ("resolution", "max_long", "stride") if hasattr(args, n)])
    crop = getattr(args, "crop_size", None)
    if crop is not None and crop < 0:
        raise UsageError(f"--crop_size must be >= 0 (0 = the whole image), got {crop}")
    check_stride(crop, getattr(args, "stride", None))


def check_stride(crop: Optional[int], stride: Optional[int]) -> None:
    if crop and stride and stride > crop:
        raise UsageError(f"--stride {stride} larger than --crop_size {crop} would leave pixels unlabelled")


def check_bg_thresh(args) -> None:
    if args.bg_thresh is not None and not 0.0 <= args.bg_thresh <= 1.0:
        raise UsageError(f"--bg_thresh must be in [0, 1], got {args.bg_thresh}")


def resolve_device(spec: Optional[str], flag: str = "--device"):
    """``--device`` -> torch.device, refused with one line when it is not usable here (checked before any model
    is loaded): not a device name, a type other than cpu / cuda, CUDA absent, or a GPU index that does not exist."""
    import torch  # kept out of import time: the preprocessing scripts import this module without needing torch
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {spec}: not a device (use cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {spec}: {dev.type} is not supported by these scripts; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {spec}: CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {spec}: there is no GPU {dev.index} ({torch.cuda.device_count()} visible)")
    return dev


def check_input_dir(path: Optional[str], flag: str) -> None:
    if path is not None and not os.path.isdir(path):
        what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise UsageError(f"{flag} {path} {what}")


def check_input_file(path: Optional[str], flag: str) -> None:
    if path is not None and not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise UsageError(f"{flag} {path} {what}")


def check_writable_dir(path: Optional[str], flag: str) -> None:
    """``path`` is, or can be made, a folder we can write files into (created here; a probe file is written and
    removed), so a bad output folder is refused before hours of work instead of after them."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path}: {_os_reason(e)}; choose another folder") from None


def check_writable_file(path: Optional[str], flag: str) -> None:
    """``path`` can be written (its folder is writable, it is not a folder itself)."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), flag + " (its folder)")


def _os_reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not writable ({e.strerror})"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a file is in the way of the folder"
    return e.strerror or str(e)


# ---------------------------------------------------------------------------------------------- entry wrapper
def error_line(e: BaseException) -> str:
    """One line: the message with its line breaks folded (a message may quote a command to run)."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return f"error: {text or type(e).__name__}"


def run_main(main: Callable[..., Optional[int]]) -> Callable[..., int]:
    """Decorator of a script's ``main(argv=None) -> int``: a :class:`SegCLIPError` (a user error: bad flag, missing
    file, unusable checkpoint ...) becomes ``error: <message>`` on stderr, printed by rank 0 only under a launcher,
    and exit status 2. Every other exception is a bug and keeps its traceback."""

    @functools.wraps(main)
    def wrapper(argv: Optional[Sequence[str]] = None) -> int:
        try:
            return int(main(argv) or 0)
        except SegCLIPError as e:
            if is_rank_zero():
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                print(error_line(e), file=sys.stderr, flush=True)
            else:
                # a launcher stops every process once one has exited with an error: give rank 0, which reports it,
                # the time to print before this (silent) rank's exit sets that off
                time.sleep(SILENT_RANK_EXIT_DELAY_S)
            return 2
    return wrapper
