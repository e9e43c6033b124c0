"""The shared command-line layer (common/cli.py) as every script uses it: flag spellings, settings files, --opts
checking, help text, input checks and the one-line error wrapper."""
import importlib
import os
import subprocess
import sys

import pytest
import torch

from common import cli
from common.errors import SegCLIPError, UsageError

SCRIPTS = ["main_task_align", "main_seg_zeroshot", "main_seg_vis", "preprocess.build_cc3m", "preprocess.build_coco",
           "preprocess.build_superpixels", "preprocess.convert_coco_object", "preprocess.synthetic", "demo.app"]


def parser_of(name):
    return importlib.import_module(name).build_parser()


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_parser_is_strict_documented_and_shows_defaults_once(name):
    p = parser_of(name)
    assert isinstance(p, cli.Parser) and p.allow_abbrev is False
    fmt = p._get_formatter()
    flags = {o for a in p._actions for o in a.option_strings}
    assert {"--cfg", "--opts"} <= flags                            # --cfg works in every script
    for a in p._actions:
        if not a.option_strings or a.dest == "help":
            continue
        text = fmt._get_help_string(a)
        assert a.help and a.help.strip(), f"{name}: {a.option_strings} has no help"
        assert text.lower().count("(default") <= 1 and text.lower().count("default:") <= 1, (name, text)


def test_help_of_a_script_does_not_double_defaults(repo_root):
    r = subprocess.run([sys.executable, "main_seg_vis.py", "--help"], cwd=repo_root, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, COLUMNS="200"))
    assert r.returncode == 0
    assert "(default: output/vis) (default" not in r.stdout and "(default: output/vis)" in r.stdout
    for line in r.stdout.splitlines():
        assert line.lower().count("default") <= 2, line       # 'default: X' once (a help may mention a default)


def test_abbreviated_flag_is_refused_even_with_cfg(tmp_path):
    """2022 bug: `--cfg x.yaml --bg_t 0.9` silently kept the file's bg_thresh."""
    import main_seg_zeroshot
    cfg = tmp_path / "x.yaml"
    cfg.write_text("bg_thresh: 0.5\n")
    with pytest.raises(UsageError, match="unrecognized arguments: --bg_t"):
        main_seg_zeroshot.parse_args(["--cfg", str(cfg), "--bg_t", "0.9"])
    args = main_seg_zeroshot.parse_args(["--cfg", str(cfg), "--bg_thresh", "0.9"])
    assert args.bg_thresh == 0.9                                 # typed flags win over the file
    assert main_seg_zeroshot.parse_args(["--cfg", str(cfg)]).bg_thresh == 0.5
    args = main_seg_zeroshot.parse_args(["--cfg", str(cfg), "--bg_thresh", "0.9", "--opts", "bg_thresh", "0.7"])
    assert args.bg_thresh == 0.7                                 # --opts wins over both


def test_cfg_supplies_required_flags_and_typed_values(tmp_path):
    import main_task_align
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"do_pretrain: true\noutput_dir: {tmp_path / 'out'}\nlr: 4.0e-3\nbatch_size: 8\namp: none\n")
    args = main_task_align.get_args(["--cfg", str(cfg), "--batch_size", "16"])
    assert (args.do_pretrain, args.output_dir, args.lr, args.batch_size, args.amp) == \
        (True, str(tmp_path / "out"), 4e-3, 16, "off")


def test_cfg_with_python_tag_is_refused_in_one_line(tmp_path, capsys):
    import main_seg_vis
    marker = tmp_path / "ran"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"bg_thresh: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main_seg_vis.main(["--cfg", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --cfg") and "!!python" in err and "line 1" in err, err
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    ("- a\n- b\n", "expected a mapping"),
    ("bg_thresh: [0.5\n", "not valid YAML"),
    ("bg_thresh: high\n", "bg_thresh 'high' is not a number (the setting of --bg_thresh)"),
    ("templates: fancy\n", "templates 'fancy' is not one of"),
    ("no_such: 1\n", "unknown setting 'no_such'"),
    ("no_bg: maybe\n", "no_bg 'maybe' is not true or false"),
])
def test_bad_settings_file_names_the_problem(content, message, tmp_path):
    import main_seg_vis
    cfg = tmp_path / "s.yaml"
    cfg.write_text(content)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        main_seg_vis.get_args(["--cfg", str(cfg)])


def test_opts_are_type_checked_and_name_the_setting(capsys):
    import main_seg_zeroshot
    assert main_seg_zeroshot.main(["--opts", "bg_thresh", "abc"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --opts: bg_thresh 'abc' is not a number (the setting of --bg_thresh)\n"
    args = main_seg_zeroshot.parse_args(["--opts", "stride=56", "batch_size", "2", "precision", "bf16",
                                         "no_progress", "true", "template", "full"])
    assert (args.stride, args.batch_size, args.precision, args.no_progress, args.templates) == \
        (56, 2, "bf16", True, "full")
    for opts, message in ((["batch_size", "2.5"], "is not an integer"), (["stride"], "has no value"),
                          (["precision", "fp8"], "is not one of fp32, bf16")):
        with pytest.raises(UsageError, match=message):
            main_seg_zeroshot.parse_args(["--opts", *opts])


def test_2022_config_keys_are_understood(tmp_path):
    """GroupViT-style nested configs: 'template' and 'img_size' map to our flags; framework keys are ignored; an
    empty 'vis: []' leaves the demo's default modes."""
    import main_seg_vis
    import main_seg_zeroshot
    cfg = tmp_path / "default.yml"
    cfg.write_text("evaluate:\n  eval_freq: 1\n  seg:\n    template: full\n    cfg: some/mmseg.py\n    opts: []\n"
                   "model_name: segclip\noutput: out\ntag: t\nvis: []\ndata:\n  img_size: 448\n")
    z = main_seg_zeroshot.parse_args(["--cfg", str(cfg)])
    assert (z.templates, z.resolution, z.output, z.tag) == ("full", 448, None, None)
    v = main_seg_vis.get_args(["--cfg", str(cfg)])
    assert (v.templates, v.resolution, v.vis) == ("full", 448, ["input_pred_label"])


def test_amp_values_in_training_and_one_precision_flag_in_evaluation(tmp_path, capsys):
    """Training's --amp takes off/none/bf16/fp16; the evaluation lowers precision one way, --precision, and names
    it when --amp is typed there."""
    import main_seg_zeroshot
    import main_task_align
    base = ["--do_pretrain", "--output_dir", str(tmp_path)]
    for value, expected in (("off", "off"), ("none", "off"), ("bf16", "bf16"), ("fp16", "fp16")):
        assert main_task_align.get_args(base + ["--amp", value]).amp == expected
    with pytest.raises(UsageError, match="off, none, bf16, fp16"):
        main_task_align.get_args(base + ["--amp", "fp8"])
    assert main_seg_zeroshot.main(["--amp", "bf16"]) == 2
    assert capsys.readouterr().err == ("error: --amp is not a flag of the evaluation: lower its precision with "
                                       "--precision bf16\n")
    assert not hasattr(main_seg_zeroshot.parse_args([]), "amp")


def test_class_names_are_parsed_the_same_in_both_scripts(tmp_path):
    import main_seg_vis
    import main_seg_zeroshot
    from seg_segmentation.classes import read_class_file
    f = tmp_path / "names.txt"
    f.write_text("# my classes\n\ncat\n  dog  \n\n# the end\n")
    assert read_class_file(f) == ["cat", "dog"]
    from seg_segmentation.synonyms import read_name_file
    assert read_name_file(f) == [["cat"], ["dog"]]                 # synonym files: the same lines
    for flag in ("--class_names", "--classes_file"):
        z = main_seg_zeroshot.parse_args([flag, str(f)])
        v = main_seg_vis.get_args([flag, str(f)])
        assert main_seg_zeroshot.read_class_names(z) == ["cat", "dog"] == main_seg_vis.vocabulary(v)[0]
    z = main_seg_zeroshot.parse_args(["--classes", "cat, dog"])
    assert main_seg_zeroshot.read_class_names(z) == ["cat", "dog"]


@pytest.mark.parametrize("names", ["cat, Cat", "traffic light, Traffic  Light", "dog, cat, DOG"])
def test_names_equal_after_the_tokenizers_lower_casing_are_duplicates(names):
    from seg_segmentation.classes import parse_class_list
    with pytest.raises(UsageError, match="duplicate class name"):
        parse_class_list(names)


def test_class_names_too_long_for_clips_prompt_are_refused(tmp_path, capsys):
    """CLIP reads 77 tokens per prompt and the tokenizer cut longer prompts silently: a name that does not fit in
    the longest template is refused wherever class names are read (--classes, synonym lines), in one line, before
    any model is loaded; a huge name is refused before it is tokenized (that alone took minutes)."""
    import time
    import main_seg_vis
    import main_seg_zeroshot
    from modules.tokenization_clip import get_tokenizer
    from seg_segmentation.classes import SURELY_FITS_BYTES, name_token_limit, parse_class_list
    from seg_segmentation.synonyms import parse_name_lines
    from seg_segmentation.templates import TEMPLATES
    limit = name_token_limit()
    assert limit == 66 and SURELY_FITS_BYTES <= limit
    longest = "cat " + "big " * limit                         # limit + 1 tokens
    fits = "cat " + "big " * (limit - 1)                      # exactly the limit
    tok = get_tokenizer()
    assert len(tok.encode(longest)) == limit + 1 and len(tok.encode(fits)) == limit
    # a name of the limit fits in every prompt of every template set, start and end tokens included
    assert max(len(tok.encode(t.format(fits))) + 2 for ts in TEMPLATES.values() for t in ts) == 77
    assert parse_class_list(f"dog, {fits}") == ["dog", fits.strip()]
    with pytest.raises(UsageError, match=f"class 1 has a name of {limit + 1} CLIP tokens"):
        parse_class_list(f"dog, {longest}")
    with pytest.raises(UsageError, match=r"line 2 \(class 1\) has a name of 67 CLIP tokens"):
        parse_name_lines(["dog, puppy", f"cat, {longest}"])
    started = time.monotonic()
    with pytest.raises(UsageError, match="a name of 5,000,000 characters; a class name may have at most 1,000"):
        parse_class_list("dog, " + "x" * 5_000_000)
    assert time.monotonic() - started < 2
    (tmp_path / "x.png").write_bytes(b"")
    root = empty_voc_layout(tmp_path / "VOC2012")
    for main, argv in ((main_seg_vis.main, ["--input", str(tmp_path / "x.png"), "--output_dir", str(tmp_path)]),
                       (main_seg_zeroshot.main, ["--dataset", "voc", "--data_root", str(root)])):
        assert main(argv + ["--classes", f"dog, {longest}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --classes: class 1 has a name of 67 CLIP tokens") and err.count("\n") == 1


@pytest.mark.parametrize("flag, value", [("--logit_scale", "nan"), ("--logit_scale", "inf"), ("--logit_scale", "0"),
                                         ("--prob_thd", "nan"), ("--prob_thd", "-0.1"), ("--prob_thd", "1.5")])
@pytest.mark.parametrize("script", ["main_seg_zeroshot", "main_seg_vis", "demo.app"])
def test_head_flags_that_would_make_every_pixel_background(script, flag, value, tmp_path, capsys):
    """--logit_scale NaN / inf / 0 and --prob_thd outside [0, 1] (or NaN) label every pixel background (or
    crash): one line and exit 2 in every tool that takes them, before any model is loaded."""
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    argv = {"main_seg_zeroshot": ["--dataset", "voc", "--data_root", str(empty_voc_layout(tmp_path / "VOC2012"))],
            "main_seg_vis": ["--input", str(tmp_path / "x.png"), "--classes", "cat", "--output_dir", str(tmp_path)],
            "demo.app": ["--port", "1"]}[script]
    main = importlib.import_module(script).main
    assert main(argv + ["--method", "sclip", flag, value, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    want = "a positive number" if flag == "--logit_scale" else "in [0, 1]"
    assert err.startswith(f"error: {flag} must be {want}, got {float(value)}") and err.count("\n") == 1, err


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "nan", "--lr must be a finite number >= 0, got nan"),
    ("--lr", "inf", "--lr must be a finite number >= 0, got inf"),
    ("--lr=-1e-4", None, "--lr must be a finite number >= 0, got -0.0001"),
    ("--lower_lr", "nan", "--lower_lr must be a finite number >= 0, got nan"),
    ("--weight_decay", "inf", "--weight_decay must be a finite number >= 0, got inf"),
    ("--opt_b2", "1", "--opt_b2 must be a number in [0, 1), got 1.0"),
    ("--warmup_proportion", "nan", "--warmup_proportion must be a number in [0, 1], got nan"),
    ("--clip_grad", "nan", "--clip_grad must be a finite number, got nan"),
    ("--mae_vis_mask_ratio", "1", "--mae_vis_mask_ratio must be a number in [0, 1), got 1.0"),
])
def test_training_numbers_are_checked_before_anything_runs(flag, value, message, tmp_path, capsys):
    import main_task_align
    flags = [flag] if value is None else [flag, value]
    assert main_task_align.main(["--do_pretrain", "--output_dir", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_wrapper_prints_one_line_exit_2_and_only_on_rank_zero(capsys, monkeypatch):
    @cli.run_main
    def main(argv=None):
        raise UsageError("first line\n    second line")

    monkeypatch.delenv("RANK", raising=False)
    assert main([]) == 2
    assert capsys.readouterr().err == "error: first line second line\n"
    monkeypatch.setenv("RANK", "1")
    assert main([]) == 2
    assert capsys.readouterr().err == ""


def test_wrapper_keeps_tracebacks_of_bugs():
    @cli.run_main
    def main(argv=None):
        raise RuntimeError("a real bug")

    with pytest.raises(RuntimeError, match="a real bug"):
        main([])
    assert issubclass(UsageError, SegCLIPError)


def test_vis_script_has_no_runtime_error_catch_all(monkeypatch, tmp_path, tiny_checkpoint):
    """A RuntimeError from inside the model is a bug: it must surface with its traceback, not as 'error:'."""
    import main_seg_vis
    from seg_segmentation import visualize

    def broken(*a, **k):
        raise RuntimeError("shape mismatch deep inside")
    monkeypatch.setattr(visualize, "SegmentationDemo", broken)
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    with pytest.raises(RuntimeError, match="deep inside"):
        main_seg_vis.main(["--input", str(tmp_path / "x.png"), "--init_model", str(tiny_checkpoint),
                           "--output_dir", str(tmp_path / "o"), "--classes", "a, b"])


@pytest.mark.parametrize("spec, message", [("mps", "mps is not supported"), ("meta", "meta is not supported"),
                                           ("tpu9", "not a device"), ("cuda:0", "CUDA is not available")])
def test_unusable_device_is_one_line(spec, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match=message):
        cli.resolve_device(spec)


def empty_voc_layout(root):
    """A data root that passes the layout check (no images: nothing beyond the checks can run)."""
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text("")
    return root


def test_eval_device_checked_before_the_model(monkeypatch, capsys, tmp_path):
    import main_seg_zeroshot
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    root = empty_voc_layout(tmp_path / "VOC2012")
    calls = []
    monkeypatch.setattr(main_seg_zeroshot, "load_model", lambda *a: calls.append(a))
    for device in ("cuda:0", "mps", "meta"):
        assert main_seg_zeroshot.main(["--dataset", "voc", "--data_root", str(root), "--device", device]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --device {device}") and err.count("\n") == 1, err
    assert not calls


def test_outputs_and_inputs_checked_before_heavy_work(tmp_path, capsys, monkeypatch):
    import main_seg_zeroshot
    import main_task_align
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    root = empty_voc_layout(tmp_path / "VOC2012")
    calls = []
    monkeypatch.setattr(main_seg_zeroshot, "load_model", lambda *a: calls.append(a))
    base = ["--dataset", "voc", "--data_root", str(root), "--device", "cpu"]
    cases = [(["--save_pred", str(blocker / "pred")], "--save_pred"),
             (["--output", str(blocker / "r.json")], "--output"),
             (["--output", str(tmp_path)], "is a folder"),
             (["--init_model", str(tmp_path / "missing.bin")], "--init_model"),
             (["--data_root", str(tmp_path / "nope")], "does not exist")]
    for extra, message in cases:
        assert main_seg_zeroshot.main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not calls
    monkeypatch.setattr(main_task_align, "build_model", lambda *a: calls.append(a))
    train = ["--do_pretrain", "--datatype", "cc", "--cc_store", str(tmp_path), "--device", "cpu"]
    for extra, message in ((["--output_dir", str(blocker)], "--output_dir"),
                           (["--output_dir", str(blocker / "sub")], "--output_dir"),
                           (["--output_dir", str(tmp_path / "o"), "--eval_data_root", str(tmp_path / "nope")],
                            "does not exist"),
                           (["--output_dir", str(tmp_path / "o"), "--init_model", str(tmp_path / "x.bin")],
                            "--init_model"),
                           (["--output_dir", str(tmp_path / "o"), "--amp", "fp16"], "needs CUDA")):
        assert main_task_align.main(train + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: "), err
    assert not calls


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UsageError, match="not writable"):
            cli.check_writable_dir(str(ro / "out"), "--output_dir")
    finally:
        ro.chmod(0o755)


def test_legacy_eval_flags_are_wired_or_named(tmp_path, capsys):
    """--seed seeds the fresh centers of --init_model none, --tag lands in the results, --max_words is named as
    having no effect (2022 command lines keep running)."""
    import main_seg_zeroshot
    args = main_seg_zeroshot.parse_args(["--seed", "3", "--tag", "run-a", "--max_words", "32", "--max_frames", "12",
                                         "--resume", "x"])
    assert (args.seed, args.tag, args.max_words) == (3, "run-a", 32)
    cli.note_ignored_flags(args)
    assert capsys.readouterr().err == ("note: --max_words, --max_frames, --resume ignored "
                                       "(2022 flags without effect here)\n")


def test_under_torchrun_only_rank_zero_prints_the_error(repo_root, tmp_path):
    """Two processes launched by torchrun, both refusing the same flag: one `error:` line, not two."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(repo_root / "preprocess" / "build_cc3m.py"), "--shards", str(tmp_path),
                        "--output_dir", str(tmp_path / "o"), "--opts", "workers", "many"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode != 0
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("error: ")]
    assert lines == ["error: --opts: workers 'many' is not an integer (the setting of --workers)"], p.stderr[-3000:]
