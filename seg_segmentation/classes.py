"""Class names and background thresholds of the zero-shot benchmarks (design.md §7.3, §7.4).

Index i of ``DATASET_CLASSES[name]`` is label value i in the ground truth the evaluation compares against (after
mmseg's ``reduce_zero_label`` where the dataset uses it). A list that starts with ``'background'`` means the
background channel comes from the threshold ``BG_THRESH[name]`` and is never encoded as text. Class names given
by users (``--classes``, ``--classes_file``) are read and checked here, the same way in every script.
"""
from functools import lru_cache
from pathlib import Path
from typing import List

from common.errors import UsageError
from modules.tokenization_clip import normalize_text

VOC_CLASSES = [
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow', 'table',
    'dog', 'horse', 'motorbike', 'person', 'plant', 'sheep', 'sofa', 'train', 'monitor',
]

# mmseg's PascalContextDataset names with aeroplane->airplane, pottedplant->plant, tvmonitor->monitor (design.md §7.4).
CONTEXT_CLASSES = [
    'background', 'airplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat', 'book', 'bottle',
    'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth', 'computer', 'cow', 'cup', 'curtain',
    'dog', 'door', 'fence', 'floor', 'flower', 'food', 'grass', 'ground', 'horse', 'keyboard', 'light', 'motorbike',
    'mountain', 'mouse', 'person', 'plate', 'platform', 'plant', 'road', 'rock', 'sheep', 'shelves', 'sidewalk',
    'sign', 'sky', 'snow', 'sofa', 'table', 'track', 'train', 'tree', 'truck', 'monitor', 'wall', 'water', 'window',
    'wood',
]

COCO_THINGS = [
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
    'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow', 'elephant',
    'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard',
    'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli',
    'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant', 'bed', 'dining table', 'toilet',
    'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush',
]
COCO_OBJECT_CLASSES = ['background'] + COCO_THINGS

# COCO-Stuff-164k: mmseg's 171 names (80 things + 91 stuff), with the annotation-tool suffixes turned into words a
# text encoder understands: 'wall-brick' -> 'brick wall', 'sky-other' / 'desk-stuff' -> 'sky' / 'desk'.
_COCO_STUFF_MMSEG = [
    'banner', 'blanket', 'branch', 'bridge', 'building-other', 'bush', 'cabinet', 'cage', 'cardboard', 'carpet',
    'ceiling-other', 'ceiling-tile', 'cloth', 'clothes', 'clouds', 'counter', 'cupboard', 'curtain', 'desk-stuff',
    'dirt', 'door-stuff', 'fence', 'floor-marble', 'floor-other', 'floor-stone', 'floor-tile', 'floor-wood', 'flower',
    'fog', 'food-other', 'fruit', 'furniture-other', 'grass', 'gravel', 'ground-other', 'hill', 'house', 'leaves',
    'light', 'mat', 'metal', 'mirror-stuff', 'moss', 'mountain', 'mud', 'napkin', 'net', 'paper', 'pavement', 'pillow',
    'plant-other', 'plastic', 'platform', 'playingfield', 'railing', 'railroad', 'river', 'road', 'rock', 'roof',
    'rug', 'salad', 'sand', 'sea', 'shelf', 'sky-other', 'skyscraper', 'snow', 'solid-other', 'stairs', 'stone',
    'straw', 'structural-other', 'table', 'tent', 'textile-other', 'towel', 'tree', 'vegetable', 'wall-brick',
    'wall-concrete', 'wall-other', 'wall-panel', 'wall-stone', 'wall-tile', 'wall-wood', 'water-other', 'waterdrops',
    'window-blind', 'window-other', 'wood',
]


def _readable_stuff_name(name: str) -> str:
    base, _, kind = name.partition('-')
    if not kind or kind in ('other', 'stuff', 'merged'):
        return base
    return f'{kind} {base}'


COCO_STUFF_CLASSES = COCO_THINGS + [_readable_stuff_name(n) for n in _COCO_STUFF_MMSEG]

CITYSCAPES_CLASSES = [
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign', 'vegetation',
    'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train', 'motorcycle', 'bicycle',
]

# mmseg's ADE20KDataset names (with its stray trailing space in 'bed ' removed).
ADE20K_CLASSES = [
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk', 'rock',
    'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard', 'chest of drawers',
    'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs', 'runway',
    'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase', 'blind',
    'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm', 'kitchen island',
    'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus', 'towel', 'light', 'truck', 'tower',
    'chandelier', 'awning', 'streetlight', 'booth', 'television receiver', 'airplane', 'dirt track', 'apparel',
    'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van', 'ship',
    'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool', 'barrel', 'basket',
    'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank', 'trade name',
    'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce',
    'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor', 'bulletin board',
    'shower', 'radiator', 'glass', 'clock', 'flag',
]

DATASET_CLASSES = {
    'voc': VOC_CLASSES,                       # 21, background from the threshold
    'context': CONTEXT_CLASSES,               # 60, background from the threshold
    'coco': COCO_OBJECT_CLASSES,              # 81 = COCO-Object, background from the threshold
    'voc20': VOC_CLASSES[1:],                 # 20, VOC background pixels ignored
    'context59': CONTEXT_CLASSES[1:],         # 59, Context background pixels ignored
    'coco_stuff': COCO_STUFF_CLASSES,         # 171
    'cityscapes': CITYSCAPES_CLASSES,         # 19
    'ade20k': ADE20K_CLASSES,                 # 150
}

# SegCLIP's thresholds (design.md §7.3). The other five benchmarks have no background class, so no threshold applies.
BG_THRESH = {'voc': 0.80, 'context': 0.25, 'coco': 0.65}


def has_background(dataset: str) -> bool:
    return DATASET_CLASSES[dataset][0] == 'background'


def foreground_names(class_names):
    """The names that get a text embedding: every class but a leading 'background'."""
    names = list(class_names)
    return names[1:] if names and names[0] == 'background' else names


def refuse_listed_background(names, keep_hint: str) -> None:
    """With a background threshold, 'background' is the class of pixels no name wins; a user's own 'background'
    would be a second one. ``keep_hint`` says how to keep it as an ordinary class in the caller's words."""
    if 'background' in (n.lower() for n in names):
        raise UsageError(f"'background' is added automatically from the background threshold; remove it from your "
                         f"classes ({keep_hint} to keep it as an ordinary class)")


# CLIP reads 77 tokens per prompt, its start and end tokens included; tokenize() cuts longer prompts silently, so a
# long name would lose its end (or, in a long template, the template's end) without a word. Names are checked
# against the room the longest prompt template leaves, whichever template set a tool uses.
CLIP_CONTEXT = 77
# Longer names are refused before they are tokenized: byte-pair encoding one huge word takes minutes.
MAX_NAME_CHARS = 1000
SURELY_FITS_BYTES = 60     # below name_token_limit(): a name this short in UTF-8 cannot have more tokens


@lru_cache()
def name_token_limit() -> int:
    """The most CLIP tokens a class name may have: 77 minus the start and end tokens and the longest template's
    own tokens (66 with the 80 ImageNet prompts)."""
    from modules.tokenization_clip import get_tokenizer
    from .templates import TEMPLATES
    tok = get_tokenizer()
    own = max(len(tok.encode(t.format(''))) for templates in TEMPLATES.values() for t in templates)
    return CLIP_CONTEXT - 2 - own


def check_name_length(name: str, source: str, what: str) -> None:
    """UsageError when ``name`` (``what``: 'class 3', for the message) would not fit in CLIP's prompt."""
    if len(name) > MAX_NAME_CHARS:
        raise UsageError(f'{source}: {what} has a name of {len(name):,} characters; a class name may have at most '
                         f'{MAX_NAME_CHARS:,} characters and {name_token_limit()} CLIP tokens')
    # a token covers at least one byte of the normalised text: short names need no tokenizer (and no vocabulary
    # loaded at import time, when the benchmarks' own names are checked)
    if len(normalize_text(name).encode('utf-8')) <= SURELY_FITS_BYTES:
        return
    from modules.tokenization_clip import get_tokenizer
    tokens = len(get_tokenizer().encode(name))
    if tokens > name_token_limit():
        raise UsageError(f'{source}: {what} has a name of {tokens} CLIP tokens ({name[:40]!r}...); CLIP reads '
                         f'{CLIP_CONTEXT} tokens per prompt, which leaves {name_token_limit()} for a class name: '
                         'shorten it')


def validate_class_names(names, source: str = 'class names') -> List[str]:
    """Names stripped of surrounding blanks; UsageError naming the problem for no names, an empty name, a name too
    long for CLIP's prompt (``check_name_length``), or two names the text encoder cannot tell apart (CLIP's
    tokenizer folds whitespace and lower-cases: 'cat, Cat')."""
    names = [str(n).strip() for n in names]
    if not names:
        raise UsageError(f'{source}: no class names')
    seen = {}
    for i, n in enumerate(names):
        if not n:
            raise UsageError(f'{source}: class {i} has an empty name')
        check_name_length(n, source, f'class {i}')
        key = normalize_text(n)
        if key in seen:
            j = seen[key]
            same = f'{names[j]!r} and {n!r} are the same text to the tokenizer, which lower-cases'
            raise UsageError(f'{source}: duplicate class name {n!r} (classes {j} and {i}'
                             + ('' if names[j] == n else f'; {same}') + ')')
        seen[key] = i
    return names


BOM = '\ufeff'   # a byte-order mark: Notepad and other Windows editors start "UTF-8" files with it


def parse_class_list(text: str, source: str = '--classes') -> List[str]:
    """'cat, dog, sky' (commas and/or newlines) -> ['cat', 'dog', 'sky']; one trailing comma is tolerated."""
    items = text.removeprefix(BOM).replace('\n', ',').split(',')
    if len(items) > 1 and not items[-1].strip():
        items = items[:-1]
    return validate_class_names(items, source)


def name_lines(text: str) -> List[str]:
    """The lines of a class-name file that name classes: stripped, without blank lines and lines starting with
    '#' (every class-name file is read this way; label i is the i-th such line). A leading byte-order mark is no
    part of the first line (text pasted from such a file into the web page keeps it)."""
    return [ln.strip() for ln in text.removeprefix(BOM).splitlines() if ln.strip() and not ln.strip().startswith('#')]


def read_name_text(path, source: str = '--classes_file', error=UsageError) -> str:
    """The text of a class-name file (every one is read here): UTF-8, a leading byte-order mark dropped
    (``utf-8-sig``), so that it neither becomes part of class 0's name nor hides a first '#' comment line.
    ``error``: the UsageError subclass raised for a file that cannot be read."""
    try:
        return Path(path).read_text(encoding='utf-8-sig')
    except (OSError, UnicodeDecodeError) as e:
        why = 'file not found' if isinstance(e, FileNotFoundError) else str(e)
        raise error(f'{source} {path}: cannot read ({why})') from None


def read_class_file(path, source: str = '--classes_file') -> List[str]:
    """One class name per line, in label order (``name_lines``)."""
    return validate_class_names(name_lines(read_name_text(path, source)), f'{source} {path}')


for _name, _classes in DATASET_CLASSES.items():
    validate_class_names(_classes, _name)
