"""A synthetic "shapes" world to prove, offline and on CPU, that SegCLIP training learns to segment.

Images show 1-3 coloured shapes on one of 4 named backgrounds (grass, sand, water, brick); captions name the
shapes and the background ("a red circle and a blue square on sand"). The train split is written in the img2dataset webdataset layout that the CC3M preprocessing
reads (``NNNNN.tar`` holding ``key.jpg``, ``key.json`` with ``caption``, ``key.txt``); the val split is written
in the PASCAL VOC layout that zero-shot evaluation reads (``JPEGImages/``, ``SegmentationClass/`` palette PNGs,
``ImageSets/Segmentation/val.txt``) plus ``classes.txt`` (one name a line: the 5 shapes, then the 4 backgrounds). Segmentation
labels are never written for the train split: the model only ever sees captions.

Each class has its own shape and its own hue (jittered), so it is recognisable at patch level within a few
minutes of CPU training; the backgrounds are muted textures, each with its own colour and pattern, and are
labelled as classes of their own (no background threshold).

``random_clip_state_dict`` builds a randomly initialised CLIP in the OpenAI state-dict layout (the format of
``ViT-B-16.pt``), at a size that trains in minutes, to stand in for the pretrained CLIP.

    python -m preprocess.synthetic --output_dir data/synthetic --num_train 2000 --num_val 40
"""
import io
import json
import math
import os
import sys
import tarfile
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from common import cli
from common.errors import UsageError
from seg_segmentation.drawing import voc_palette

# (name, shape, base RGB, colour word). Hues are spread round the colour wheel and fully saturated so no
# (muted) background texture can be mistaken for an object.
CLASSES = [
    ("circle", "circle", (220, 40, 40), "red"),
    ("square", "square", (40, 80, 230), "blue"),
    ("triangle", "triangle", (40, 200, 60), "green"),
    ("star", "star", (240, 210, 30), "yellow"),
    ("cross", "cross", (200, 50, 220), "purple"),
]
# Named backgrounds (name, base RGB, texture): each image has one, the caption names it ("... on sand") and its
# pixels carry its own label, so zero-shot evaluation needs no background threshold. Muted (saturation <= ~80 of
# 255, the shapes have >= ~120) and each with its own texture, so no background is mistaken for a shape.
BACKGROUNDS = [
    ("grass", (95, 135, 70), "streaks"),
    ("sand", (205, 185, 145), "grain"),
    ("water", (70, 105, 150), "waves"),
    ("brick", (150, 85, 70), "grid"),
]
# Label ids: 0..4 the shapes, 5..8 the backgrounds (no 'background' line: every pixel has a named class).
CLASS_NAMES = [c[0] for c in CLASSES] + [b[0] for b in BACKGROUNDS]
NUM_SHAPES = len(CLASSES)
SHAPE_RADIUS = (0.14, 0.24)   # outer radius of a shape, fraction of the image side

# Caption templates: several phrasings so the text tower learns the nouns rather than one sentence; the
# zero-shot default template "a photo of a {}." appears among them.
_ONE = ["a photo of a {}.", "a {}.", "a picture of a {}.", "{}"]
_JOIN = ["a photo of {}.", "{}.", "a picture of {}.", "{}"]


@dataclass
class Sample:
    image: Image.Image      # RGB, size x size
    label: np.ndarray       # [size, size] uint8, k = CLASS_NAMES[k]
    caption: str
    classes: list           # shape class ids present (0-based), in caption order
    background: int         # class id of the background (NUM_SHAPES + index into BACKGROUNDS)


def _background(rng: np.random.Generator, size: int, kind: int) -> np.ndarray:
    """Texture [size, size, 3] float of BACKGROUNDS[kind]: its muted colour (jittered) plus its own pattern."""
    _, rgb, texture = BACKGROUNDS[kind]
    colour = np.array(rgb, np.float32) + rng.uniform(-8, 8, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cells = int(rng.integers(3, 9))
    coarse = rng.normal(0, 10, size=(cells, cells)).astype(np.float32)
    shade = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))[..., None]
    if texture == "streaks":    # grass: short vertical blades of lighter / darker green
        blades = np.asarray(Image.fromarray(rng.normal(0, 1, size=(size // 8, size)).astype(np.float32)).resize(
            (size, size), Image.BICUBIC))
        pattern = 18 * blades[..., None] * np.array([0.6, 1.0, 0.5])
    elif texture == "grain":    # sand: fine speckle
        pattern = rng.normal(0, 12, size=(size, size, 1))
    elif texture == "waves":    # water: horizontal bright stripes
        period = rng.uniform(8, 14)
        pattern = 20 * np.sin(yy * 2 * math.pi / period + 0.5 * np.sin(xx / 9))[..., None] * np.array([0.6, 0.8, 1.0])
    else:                       # brick: light mortar lines on a staggered grid
        h = rng.uniform(10, 14)
        row = np.floor(yy / h)
        mortar = ((yy % h) < 2) | (((xx + (row % 2) * 1.5 * h) % (3 * h)) < 2)
        pattern = np.where(mortar[..., None], np.array([190, 180, 170], np.float32) - colour, 0)
    return colour[None, None, :] + shade + pattern


def _shape_polygon(shape: str, cx: float, cy: float, r: float, rot: float):
    """Vertices of `shape` centred at (cx, cy) with outer radius r, or None for the circle."""
    def ring(n, radii, offset=0.0):
        return [(cx + rad * math.cos(rot + offset + 2 * math.pi * i / n),
                 cy + rad * math.sin(rot + offset + 2 * math.pi * i / n)) for i, rad in enumerate(radii)]
    if shape == "circle":
        return None
    if shape == "square":
        return ring(4, [r] * 4, math.pi / 4)
    if shape == "triangle":
        return ring(3, [r] * 3, -math.pi / 2)
    if shape == "star":
        return ring(10, [r, 0.45 * r] * 5, -math.pi / 2)
    if shape == "cross":  # plus sign: 12 vertices, arm half-width w
        w = 0.35 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}")


def make_sample(rng: np.random.Generator, size: int = 128, max_objects: int = 3,
                radius: tuple = SHAPE_RADIUS) -> Sample:
    """One image with 1..max_objects objects of distinct classes, its label map and a caption naming them.

    radius: (low, high) outer radius of a shape as a fraction of ``size``, drawn uniformly."""
    n = int(rng.integers(1, max_objects + 1))
    class_ids = [int(c) for c in rng.choice(len(CLASSES), size=n, replace=False)]
    kind = int(rng.integers(len(BACKGROUNDS)))
    img = _background(rng, size, kind)
    label = np.full((size, size), NUM_SHAPES + kind, np.uint8)
    placed = []  # (cx, cy, r): rejection sampling keeps objects mostly apart so each stays visible
    for k in class_ids:
        for _ in range(50):
            r = rng.uniform(*radius) * size
            cx, cy = rng.uniform(r, size - r, size=2)
            if all(math.hypot(cx - x, cy - y) > 0.8 * (r + q) for x, y, q in placed):
                break
        placed.append((cx, cy, r))
        _, shape, rgb, _ = CLASSES[k]
        mask_img = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask_img)
        poly = _shape_polygon(shape, cx, cy, r, rng.uniform(-0.3, 0.3))
        if poly is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        else:
            draw.polygon(poly, fill=1)
        mask = np.asarray(mask_img, bool)
        colour = np.clip(np.array(rgb, np.float32) + rng.uniform(-30, 30, size=3), 0, 255)
        shading = rng.normal(0, 8, size=(size, size, 1))
        img = np.where(mask[..., None], colour[None, None, :] + shading, img)
        label[mask] = k  # later objects occlude earlier ones, in the picture and in the labels
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")

    # Name only what is still visible, in a random order, with the colour word half of the time.
    visible = [k for k in class_ids if (label == k).sum() > 0]
    order = [visible[i] for i in rng.permutation(len(visible))]
    words = [(CLASSES[k][3] + " " if rng.random() < 0.5 else "") + CLASSES[k][0] for k in order]
    where = " on " + BACKGROUNDS[kind][0]   # the background is named too: it is a class like the shapes
    if len(words) == 1:
        caption = _ONE[int(rng.integers(len(_ONE)))].format(words[0] + where)
    else:
        listed = ", a ".join(words[:-1]) + " and a " + words[-1]
        caption = _JOIN[int(rng.integers(len(_JOIN)))].format("a " + listed + where)
    return Sample(image, label, caption, order, NUM_SHAPES + kind)


def _jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def write_train_shards(out_dir: str, num: int, size: int, seed: int, shard_size: int = 1000,
                       radius: tuple = SHAPE_RADIUS, max_objects: int = 3) -> list[str]:
    """img2dataset-style webdataset shards ``out_dir/NNNNN.tar``; returns the shard paths."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, tar = [], None
    for i in tqdm(range(num), desc="train shards", unit="img"):
        shard, idx = divmod(i, shard_size)
        if idx == 0:
            if tar is not None:
                tar.close()
            paths.append(os.path.join(out_dir, f"{shard:05d}.tar"))
            tar = tarfile.open(paths[-1], "w")
        s = make_sample(rng, size, max_objects, radius)
        key = f"{shard:05d}{idx:04d}"
        meta = {"caption": s.caption, "key": key, "status": "success", "width": size, "height": size}
        for ext, data in (("jpg", _jpeg_bytes(s.image)), ("json", json.dumps(meta).encode()),
                          ("txt", s.caption.encode())):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if tar is not None:
        tar.close()
    return paths


def write_voc_split(out_dir: str, num: int, size: int, seed: int, radius: tuple = SHAPE_RADIUS,
                    max_objects: int = 3) -> str:
    """A VOC-layout split with per-pixel labels and ``classes.txt``; returns ``out_dir``."""
    for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = voc_palette().flatten().tolist()
    names = []
    for i in tqdm(range(num), desc="val split", unit="img"):
        s = make_sample(rng, size, max_objects, radius)
        name = f"val_{i:05d}"
        s.image.save(os.path.join(out_dir, "JPEGImages", name + ".jpg"), quality=92)
        png = Image.fromarray(s.label, "P")
        png.putpalette(palette)
        png.save(os.path.join(out_dir, "SegmentationClass", name + ".png"))
        names.append(name)
    with open(os.path.join(out_dir, "ImageSets", "Segmentation", "val.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.write("\n".join(CLASS_NAMES) + "\n")
    return out_dir


def random_clip_state_dict(embed_dim: int = 64, image_resolution: int = 64, vision_layers: int = 4,
                           vision_width: int = 64, vision_patch_size: int = 16, context_length: int = 77,
                           vocab_size: int = 49408, text_width: int = 64, text_layers: int = 2,
                           seed: int = 0) -> dict:
    """A randomly initialised CLIP ViT in the OpenAI state-dict layout (keys and init as OpenAI's model.py).

    Heads are width / 64 for both towers, as in CLIP; the token embedding keeps CLIP's vocabulary so the real
    BPE tokenizer applies.
    """
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=g) * std

    sd = {}

    def blocks(prefix, width, layers):
        attn_std, proj_std, fc_std = width ** -0.5, (width ** -0.5) * (2 * layers) ** -0.5, (2 * width) ** -0.5
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}."
            sd[p + "attn.in_proj_weight"] = normal((3 * width, width), attn_std)
            sd[p + "attn.in_proj_bias"] = torch.zeros(3 * width)
            sd[p + "attn.out_proj.weight"] = normal((width, width), proj_std)
            sd[p + "attn.out_proj.bias"] = torch.zeros(width)
            sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = torch.ones(width), torch.zeros(width)
            sd[p + "mlp.c_fc.weight"] = normal((4 * width, width), fc_std)
            sd[p + "mlp.c_fc.bias"] = torch.zeros(4 * width)
            sd[p + "mlp.c_proj.weight"] = normal((width, 4 * width), proj_std)
            sd[p + "mlp.c_proj.bias"] = torch.zeros(width)
            sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = torch.ones(width), torch.zeros(width)

    if image_resolution % vision_patch_size:
        raise ValueError("image_resolution must be a multiple of vision_patch_size")
    grid = image_resolution // vision_patch_size
    scale = vision_width ** -0.5
    sd["positional_embedding"] = normal((context_length, text_width), 0.01)
    sd["text_projection"] = normal((text_width, embed_dim), text_width ** -0.5)
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    sd["visual.class_embedding"] = normal((vision_width,), scale)
    sd["visual.positional_embedding"] = normal((grid * grid + 1, vision_width), scale)
    sd["visual.proj"] = normal((vision_width, embed_dim), scale)
    # nn.Conv2d's default (kaiming-uniform, a=sqrt(5)) bound = 1/sqrt(fan_in)
    bound = 1 / math.sqrt(3 * vision_patch_size ** 2)
    sd["visual.conv1.weight"] = (torch.rand((vision_width, 3, vision_patch_size, vision_patch_size), generator=g)
                                 * 2 - 1) * bound
    sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"] = torch.ones(vision_width), torch.zeros(vision_width)
    blocks("visual.transformer", vision_width, vision_layers)
    sd["visual.ln_post.weight"], sd["visual.ln_post.bias"] = torch.ones(vision_width), torch.zeros(vision_width)
    blocks("transformer", text_width, text_layers)
    sd["token_embedding.weight"] = normal((vocab_size, text_width), 0.02)
    sd["ln_final.weight"], sd["ln_final.bias"] = torch.ones(text_width), torch.zeros(text_width)
    return sd


def build_parser():
    p = cli.make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True,
                   help="writes train/NNNNN.tar, val/ (VOC layout + classes.txt) and, with --clip, the CLIP file")
    p.add_argument("--num_train", type=int, default=2000, help="image-caption pairs in the train shards")
    p.add_argument("--num_val", type=int, default=40, help="images with per-pixel labels in the val split")
    p.add_argument("--size", type=int, default=128, help="side of the square images in pixels")
    p.add_argument("--shard_size", type=int, default=1000, help="samples per train .tar shard")
    p.add_argument("--shape_radius", type=float, nargs=2, default=SHAPE_RADIUS, metavar=("LOW", "HIGH"),
                   help="outer radius of a shape as a fraction of --size, drawn uniformly in [LOW, HIGH]")
    p.add_argument("--max_objects", type=int, default=3, help="shapes per image: 1..N, of distinct classes")
    p.add_argument("--seed", type=int, default=0, help="train uses seed, val uses seed + 1 (disjoint draws)")
    p.add_argument("--clip", default=None, metavar="FILE",
                   help="also write a random CLIP state dict (OpenAI layout) to FILE, relative to --output_dir")
    p.add_argument("--clip_width", type=int, default=64, help="random CLIP: visual and text width (heads = width/64)")
    p.add_argument("--clip_embed_dim", type=int, default=64, help="random CLIP: joint embedding size")
    p.add_argument("--clip_vision_layers", type=int, default=4, help="random CLIP: visual blocks")
    p.add_argument("--clip_text_layers", type=int, default=2, help="random CLIP: text blocks")
    p.add_argument("--clip_resolution", type=int, default=64, help="random CLIP: input resolution (patch 16)")
    return p


def get_args(argv=None):
    return cli.parse(build_parser(), argv)


@cli.run_main
def main(argv=None):
    args = get_args(argv)
    if args.num_train < 1 or args.num_val < 1 or args.size < 32:
        raise UsageError("--num_train and --num_val must be >= 1 and --size >= 32")
    cli.check_writable_dir(args.output_dir, "--output_dir")
    train = write_train_shards(os.path.join(args.output_dir, "train"), args.num_train, args.size, args.seed,
                               args.shard_size, tuple(args.shape_radius), args.max_objects)
    val = write_voc_split(os.path.join(args.output_dir, "val"), args.num_val, args.size, args.seed + 1,
                          tuple(args.shape_radius), args.max_objects)
    print(f"wrote {args.num_train} train pairs in {len(train)} shard(s) under {os.path.dirname(train[0])}")
    print(f"wrote {args.num_val} val images (VOC layout, {len(CLASS_NAMES)} classes) under {val}")
    if args.clip:
        path = os.path.join(args.output_dir, args.clip)
        sd = random_clip_state_dict(embed_dim=args.clip_embed_dim, image_resolution=args.clip_resolution,
                                    vision_layers=args.clip_vision_layers, vision_width=args.clip_width,
                                    text_width=args.clip_width, text_layers=args.clip_text_layers, seed=args.seed)
        torch.save(sd, path)
        print(f"wrote a random CLIP ({sum(v.numel() for v in sd.values()):,} values) to {path}")


if __name__ == "__main__":
    sys.exit(main())
