"""Class-name files with synonyms: one line per class (in label order), its names separated by commas.

    person, man, woman
    tv monitor, screen

Every name is a text query; a class scores the best of its names. The first line of a dataset with background may
list stuff names ("sky, wall, floor, ...") that stand for it. The project's own files for the eight benchmarks live
in ``seg_segmentation/names/`` (``dataset_name_file``); a file of one name per line is the plain format.
"""
from pathlib import Path
from typing import List, Sequence, Tuple, Union

from common.errors import UsageError
from modules.tokenization_clip import normalize_text

from .classes import check_name_length, name_lines, read_name_text

NAMES_DIR = Path(__file__).resolve().parent / 'names'

# benchmark -> file in NAMES_DIR (written for this project; see NAMES_DIR / 'README.md')
DATASET_NAME_FILES = {
    'voc': 'voc21.txt', 'context': 'context60.txt', 'coco': 'coco_object.txt', 'voc20': 'voc20.txt',
    'context59': 'context59.txt', 'coco_stuff': 'coco_stuff.txt', 'cityscapes': 'cityscapes.txt',
    'ade20k': 'ade20k.txt',
}


class ClassNamesError(UsageError):
    """A class-name list or file is empty, has an empty name or names one thing twice."""


def parse_name_lines(lines: Sequence[str], source: str = 'class names') -> List[List[str]]:
    """Class lines -> per class its names (stripped). Trailing blank lines are dropped; an empty line or name, or
    a name given twice (compared as the tokenizer sees it: ``normalize_text``, lower-cased) raises ClassNamesError
    naming both places."""
    lines = [str(line) for line in lines]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ClassNamesError(f'{source}: no class names')
    classes, seen = [], {}
    for i, line in enumerate(lines):
        names = [n.strip() for n in line.split(',')]
        if not any(names):
            raise ClassNamesError(f'{source}: line {i + 1} (class {i}) is empty; give every class a name')
        if not all(names):
            raise ClassNamesError(f'{source}: line {i + 1} (class {i}) has an empty name in {line.strip()!r}; '
                                  'separate names with ", " and no trailing comma')
        for n in names:
            check_name_length(n, source, f'line {i + 1} (class {i})')
            key = normalize_text(n)
            if key in seen:
                j, other = seen[key]
                same = '' if other == n else f'; {other!r} and {n!r} are the same text to the tokenizer'
                raise ClassNamesError(f'{source}: duplicate class name {n!r} (classes {j} and {i}{same}); each '
                                      'name may stand for one class only')
            seen[key] = (i, n)
        classes.append(names)
    return classes


def read_name_file(path: Union[str, Path], source: str = 'class-name file') -> List[List[str]]:
    """A class-name file (UTF-8, with or without a byte-order mark) -> per class its names; blank lines and '#'
    lines are skipped, as in every class-name file (``classes.name_lines``), so class i is the i-th remaining line."""
    path = Path(path)
    text = read_name_text(path, source, error=ClassNamesError)
    return parse_name_lines(name_lines(text), source=f'{source} {path}')


def dataset_name_file(dataset: str) -> Path:
    """The project's synonym file for a benchmark (``--dataset`` name)."""
    if dataset not in DATASET_NAME_FILES:
        raise ClassNamesError(f'no synonym file for dataset {dataset!r}; known: {sorted(DATASET_NAME_FILES)}')
    return NAMES_DIR / DATASET_NAME_FILES[dataset]


def flatten(classes: Sequence[Sequence[str]]) -> Tuple[List[str], List[int]]:
    """Per-class names -> (every name, the class index of each)."""
    names = [n for c in classes for n in c]
    idx = [i for i, c in enumerate(classes) for _ in c]
    return names, idx
