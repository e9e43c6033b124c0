"""SegCLIP pretraining on image-caption pairs (design.md §4-§6).

The published run (8 GPUs x 96 = global batch 768, 10 epochs):

    torchrun --nproc_per_node=8 main_task_align.py --do_pretrain --num_thread_reader=10 --epochs=10 \\
        --batch_size=768 --n_display=50 --output_dir ckpts/ckpt_segclip --lr 4e-3 --max_words 32 \\
        --datatype cc,coco, --lower_lr 4e-6 --use_pin_memory --use_seglabel --use_vision_mae_recon

Also runs under ``python -m torch.distributed.launch`` and as a single ``python`` process (CPU when no CUDA).
"""
import json
import logging
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from common import cli
from common.errors import SegCLIPError, UsageError
from dataloaders.pretrain import add_data_args, check_data_paths
from seg_segmentation.classes import DATASET_CLASSES
from seg_segmentation.datasets import resolve_data_root

logger = logging.getLogger("segclip.train")
error_log = logging.getLogger("segclip.train.error")   # log.txt only (nothing before log.txt is open)
error_log.propagate = False
error_log.addHandler(logging.NullHandler())


def build_parser():
    p = cli.make_parser("SegCLIP pretraining (image-caption contrastive + superpixel KL + MAE)")
    p.add_argument("--do_pretrain", action="store_true", help="run pretraining (required, as in the 2022 script)")
    # ---- model
    cli.add_checkpoint_args(
        p, init_model_help="SegCLIP state dict loaded on top of the CLIP initialisation (e.g. pytorch_model.bin.N)",
        clip_help="CLIP weights to start from: a name (ViT-B/16, downloaded and SHA-256 checked) or a file "
                  "(OpenAI TorchScript archive or plain state dict)")
    g = p.add_argument_group("model")
    g.add_argument("--use_vision_mae_recon", action="store_true", help="add the MAE reconstruction loss")
    g.add_argument("--mae_vis_mask_ratio", type=float, default=0.75, help="fraction of patches the MAE pass removes")
    g.add_argument("--use_seglabel", action="store_true", help="add the superpixel KL loss (needs superpixel data)")
    g.add_argument("--plain_clip", action="store_true",
                   help="train as a plain CLIP: the center block is skipped, the visual tokens are max-pooled, "
                        "contrastive loss only, patch embedding not frozen (a CLIP pretraining stage for a world without a "
                        "pretrained CLIP; its pytorch_model.bin.N is then the --init_model of the SegCLIP stage)")
    g.add_argument("--freeze_layer_num", type=int, default=0,
                   help="freeze the visual and text blocks below this index (0..12); -1 disables the freezing loop. "
                        "0 still freezes the embeddings, conv1 and ln_pre (2022 behaviour)")
    g.add_argument("--freeze_text_layer_num", type=int, default=0,
                   help="> 0: also freeze the text embeddings and the text blocks below this index")
    # ---- optimisation
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=256,
                   help="GLOBAL batch per optimizer step (split over processes and accumulation steps)")
    g.add_argument("--epochs", type=int, default=20, help="training epochs")
    g.add_argument("--lr", type=float, default=1e-4, help="LR of the new parts (centers, layers2, MAE, proj)")
    g.add_argument("--lower_lr", type=float, default=0.0, help="LR of inherited CLIP parts; 0 means lr * coef_lr")
    g.add_argument("--lower_text_lr", type=float, default=0.0,
                   help="LR of the text token/positional embeddings; 0 means lower_lr")
    g.add_argument("--coef_lr", type=float, default=1.0, help="lower_lr = lr * coef_lr when --lower_lr is 0")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (not on biases)")
    g.add_argument("--opt_b1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--opt_b2", type=float, default=0.98, help="AdamW beta2")
    g.add_argument("--eps", type=float, default=1e-6, help="AdamW epsilon")
    g.add_argument("--warmup_proportion", type=float, default=0.15, help="fraction of steps with linear warm-up")
    g.add_argument("--lr_start", type=float, default=0.0, help="warm-up start LR as a fraction of each group's LR")
    g.add_argument("--lr_end", type=float, default=0.0, help="final LR as a fraction of each group's LR")
    g.add_argument("--clip_grad", type=float, default=1.0, help="max gradient norm (<= 0: no clipping)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max_nonfinite_steps", type=int, default=20,
                   help="stop with an error after this many consecutive optimizer steps with a non-finite loss or "
                        "gradient (each one is skipped); the last good training state stays the latest. 0: never")
    g.add_argument("--no_tf32", action="store_true",
                   help="--amp off on a GPU with TF32 (Ampere or later): keep matmuls in full fp32 instead of TF32")
    g.add_argument("--seed", type=int, default=cli.PAPER_SEED,
                   help="seed of initialisation, data order and augmentation")
    g.add_argument("--max_words", type=int, default=77, help="caption tokens incl. SOT/EOT (the recipe uses 32)")
    # ---- data loading
    g = p.add_argument_group("data loading")
    g.add_argument("--num_thread_reader", type=int, default=1, help="DataLoader worker processes per GPU/process")
    g.add_argument("--use_pin_memory", action="store_true", help="pin host memory of batches (CUDA only)")
    g.add_argument("--steps_per_epoch", type=int, default=0,
                   help="optimizer steps per epoch for a streaming dataset that has no length")
    # ---- output, checkpoints, resuming
    g = p.add_argument_group("output, checkpoints, resuming")
    g.add_argument("--output_dir", required=True, help="checkpoints, training state and log.txt go here")
    g.add_argument("--save_every_steps", type=int, default=0,
                   help="also write the training state every N optimizer steps (0: at epoch ends only)")
    g.add_argument("--resume_model", default=None,
                   help="training_state.pt to continue from (mid-epoch, same batches)")
    g.add_argument("--resume", choices=["auto"], default=None,
                   help="'auto': continue from OUTPUT_DIR/training_state.pt when it exists, else start fresh")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output_dir that holds an earlier run's training state, replacing "
                        "its training_state.pt and metrics.jsonl (without it, such a folder is refused unless "
                        "--resume auto continues it)")
    g.add_argument("--stop_after_steps", type=int, default=0,
                   help="stop after this many optimizer steps in total (the schedule still spans --epochs); "
                        "the state is saved so that --resume auto continues (for time-limited jobs)")
    g.add_argument("--n_display", type=int, default=100,
                   help="log every N optimizer steps, to log.txt and OUTPUT_DIR/metrics.jsonl")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to OUTPUT_DIR/tensorboard")
    # ---- evaluation after each epoch
    g = p.add_argument_group("evaluation after each epoch")
    g.add_argument("--eval_data_root", default=None,
                   help="zero-shot segmentation data (mmseg layout) evaluated after every epoch; none: skip")
    g.add_argument("--eval_dataset", default="voc", choices=sorted(DATASET_CLASSES),
                   help="which benchmark --eval_data_root holds")
    g.add_argument("--eval_max_images", type=int, default=None,
                   help="evaluate only the first N images of the split (quick checks)")
    cli.add_runtime_args(p, amp_help="autocast precision; off = fp32 (the published recipe); fp16 uses a "
                                     "gradient scaler and needs CUDA")
    add_data_args(p)
    return p


def get_args(argv=None):
    args = cli.parse(build_parser(), argv)
    if not args.do_pretrain:
        raise UsageError("nothing to do: pass --do_pretrain")
    if args.resume_model and args.resume:
        raise UsageError("give either --resume_model FILE or --resume auto, not both")
    if args.overwrite and args.resume:
        raise UsageError("give either --resume auto (continue the run in --output_dir) or --overwrite (start "
                         "afresh there), not both")
    if args.plain_clip and args.use_seglabel:
        raise UsageError("--plain_clip trains without centers, so the superpixel loss has nothing to act on: "
                         "drop --use_seglabel")
    cli.check_positive(args, "batch_size", "epochs", "gradient_accumulation_steps", "max_words", "eval_max_images")
    # the optimiser's numbers, before a model is built: NaN or inf would train nothing (or fail deep in AdamW)
    for name in ("lr", "lower_lr", "lower_text_lr", "coef_lr", "weight_decay", "eps", "lr_start", "lr_end"):
        cli.check_number(args, name, low=0.0)
    for name in ("opt_b1", "opt_b2", "mae_vis_mask_ratio"):
        cli.check_number(args, name, 0.0, 1.0, high_open=True)
    cli.check_number(args, "warmup_proportion", 0.0, 1.0)
    cli.check_number(args, "clip_grad")
    return args


def check_inputs(args) -> None:
    """Paths, outputs and device, before any model is loaded or any step is taken."""
    cli.check_writable_dir(args.output_dir, "--output_dir")
    cli.check_input_file(args.init_model, "--init_model")
    cli.check_input_file(args.resume_model, "--resume_model")
    if args.eval_data_root is not None:
        resolve_data_root(args.eval_dataset, args.eval_data_root)
    check_data_paths(args)
    from engine.precision import check_precision
    check_precision(args.amp, cli.resolve_device(args.device))


def setup_logging(output_dir: str, is_main: bool) -> None:
    """Log lines to stdout and (rank 0) OUTPUT_DIR/log.txt; ``error_log`` writes to log.txt only (the error itself
    reaches stderr through cli.run_main)."""
    root = logging.getLogger()
    root.handlers.clear()
    error_log.handlers[:] = [logging.NullHandler()]
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%m/%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if is_main:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(os.path.join(output_dir, "log.txt"))
        fh.setFormatter(fmt)
        root.addHandler(fh)
        error_log.addHandler(fh)
    root.setLevel(logging.INFO if is_main else logging.WARNING)


# The flags that say which samples an epoch holds, per source of --datatype; the resumed position (a micro-batch of
# an epoch) means nothing on other data.
SOURCE_FLAGS = {"cc": ("cc_store",), "coco": ("coco_store", "karpathy_json", "coco_splits"),
                "wds": ("wds_shards", "wds_samples_per_epoch")}


def _sources(datatype) -> list:
    """--datatype -> its sources ("cc,coco," and "cc,coco" are the same data)."""
    return [v.strip() for v in str(datatype).split(",") if v.strip()]


def _same_value(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str):       # a path given relative once, absolute the other time
        return a == b or os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))
    return a == b


def warn_about_other_data(state, args) -> None:
    """One warning line when the training state was written for other data than these flags select: another
    --datatype, or another folder (or split) of a source both runs use."""
    saved = (state or {}).get("args") or {}
    if "datatype" not in saved:
        return
    before, now = _sources(saved["datatype"]), _sources(args.datatype)
    changed = [] if before == now else [f"--datatype {','.join(before)}, now {','.join(now)}"]
    for source in (s for s in now if s in before):
        changed += [f"--{k} {saved[k]}, now {getattr(args, k)}" for k in SOURCE_FLAGS.get(source, ())
                    if k in saved and not _same_value(saved[k], getattr(args, k))]
    if changed:
        logger.warning("the training state was written for other data (%s): its position in epoch %d (micro-batch "
                       "%d) is applied to this data, so the resumed epoch does not continue the interrupted one",
                       "; ".join(changed), int(state["epoch"]) + 1, int(state["micro_step"]))


def build_model(args):
    """SegCLIP from CLIP weights, ``--init_model`` on top, freezing applied."""
    from modules.checkpoint import load_clip_state_dict, load_state_dict_file
    from modules.modeling import SegCLIP
    from modules.state_dict import load_into
    from engine.optimization import apply_freezing
    model = SegCLIP.from_clip(load_clip_state_dict(args.pretrained_clip_name, cache_dir=args.cache_dir),
                              first_stage_layer=args.first_stage_layer,
                              use_vision_mae_recon=args.use_vision_mae_recon, use_seglabel=args.use_seglabel,
                              mae_mask_ratio=args.mae_vis_mask_ratio, plain_clip=args.plain_clip)
    if args.init_model:
        load_into(model, load_state_dict_file(args.init_model), strict=True)
        logger.info("loaded --init_model %s", args.init_model)
    # A plain-CLIP stage is CLIP's own pretraining: no inherited patch embedding to keep (2022 froze it always).
    frozen = apply_freezing(model, args.freeze_layer_num, args.freeze_text_layer_num,
                            freeze_patch_embed=not args.plain_clip)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("parameters: %.2fM trainable, %.2fM total; frozen tensors: %s", n_train / 1e6,
                sum(p.numel() for p in model.parameters()) / 1e6, ", ".join(frozen))
    return model


def make_eval_fn(args, device):
    if not args.eval_data_root:
        logger.info("no --eval_data_root: skipping the zero-shot evaluation after each epoch")
        return None
    from seg_segmentation.evaluate import run_zero_shot_eval

    def eval_fn(model, epoch):   # every rank evaluates its share of the images; the metrics are all-reduced
        res = run_zero_shot_eval(model, dataset=args.eval_dataset, data_root=args.eval_data_root, device=device,
                                 num_workers=min(2, args.num_thread_reader), max_images=args.eval_max_images,
                                 progress=not args.no_progress)
        return {k: (None if v is None else float(v))        # mIoU is None when no pixel was labelled
                for k, v in res.items() if k in ("mIoU", "aAcc", "mAcc", "images", "seconds")}
    return eval_fn


@cli.run_main
def main(argv=None) -> int:
    args = get_args(argv)
    check_inputs(args)
    from engine.distributed import cleanup, init_distributed
    from engine.optimization import OptimConfig
    from engine.run_lock import lock_output_dir
    from engine.train_state import load_resume_state
    from engine.training import TrainConfig, check_batch_layout, train

    # a launcher without MASTER_ADDR etc.: DistributedSetupError, a SegCLIPError that run_main prints as one line
    env = init_distributed(args.local_rank, device=args.device, backend=args.dist_backend)
    lock = None
    try:
        lock = lock_output_dir(env, args.output_dir)   # before log.txt is opened: a second run must not touch it
        setup_logging(args.output_dir, env.is_main)
        if env.is_main:
            logger.info("arguments: %s", json.dumps(vars(args), sort_keys=True, default=str))
        cfg = TrainConfig(
            batch_size=args.batch_size, epochs=args.epochs, gradient_accumulation_steps=args.gradient_accumulation_steps,
            optim=OptimConfig(lr=args.lr, lower_lr=args.lower_lr, lower_text_lr=args.lower_text_lr,
                              coef_lr=args.coef_lr, weight_decay=args.weight_decay, betas=(args.opt_b1, args.opt_b2),
                              eps=args.eps, warmup_proportion=args.warmup_proportion, lr_start=args.lr_start,
                              lr_end=args.lr_end),
            clip_grad=args.clip_grad, amp=args.amp, tf32=not args.no_tf32, seed=args.seed,
            num_workers=args.num_thread_reader, pin_memory=args.use_pin_memory, output_dir=args.output_dir,
            save_every_steps=args.save_every_steps, stop_after_steps=args.stop_after_steps,
            max_nonfinite_steps=args.max_nonfinite_steps, n_display=args.n_display, tensorboard=args.tensorboard,
            progress=not args.no_progress, steps_per_epoch=args.steps_per_epoch)
        check_batch_layout(cfg, env.world_size)
        resume_state = load_resume_state(env, args.output_dir, resume_model=args.resume_model,
                                         auto=args.resume == "auto", overwrite=args.overwrite)
        if env.is_main:
            warn_about_other_data(resume_state, args)

        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        model = build_model(args)

        from dataloaders.pretrain import build_pretrain_dataset
        from dataloaders.workers import set_main_process_threads
        set_main_process_threads(args.num_thread_reader)   # this process's cores minus its loader workers
        try:   # after the model: the superpixel patch grid is the model's
            dataset = build_pretrain_dataset(args, patch_size=model.patch_size)
        except ValueError as e:                   # dataloaders.pretrain reports bad data flags as ValueError
            if isinstance(e, SegCLIPError):
                raise
            raise UsageError(str(e)) from e
        result = train(model, dataset, cfg, env, resume_state=resume_state,
                       eval_fn=make_eval_fn(args, env.device),
                       extra_state={"args": {k: v for k, v in vars(args).items()
                                             if isinstance(v, (str, int, float, bool, type(None)))}})
        if env.is_main:
            logger.info("%s after %d optimizer steps (%d skipped)", "finished" if result.finished else "stopped",
                        result.global_step, result.skipped_steps)
        if result.stop_reason in ("SIGTERM", "SIGINT"):   # interrupted, cleanly: state saved, no traceback
            return 128 + getattr(signal, result.stop_reason)
        return 0
    except SegCLIPError as e:
        error_log.error("error: %s", e)
        raise
    finally:
        if lock is not None:
            lock.release()
        cleanup(env)


if __name__ == "__main__":
    sys.exit(main())
