"""The methods × datasets table of one evaluation command (``main_seg_zeroshot.py --method a,b --dataset x,y
--output_dir DIR``): where each pair's result lives, whether a rerun may skip it, and the tables.

    DIR/<method>/<dataset>.json    one evaluation's result (run_zero_shot_eval's, plus the ``request`` it answers)
    DIR/results.md, results.csv    mIoU per method (rows) and dataset (columns), and the mean over the datasets

A pair is done when its JSON holds a result for the same ``request`` (the settings, weights and data the command
asks for): a rerun skips it, and a changed flag re-evaluates it.
"""
import csv
import io
import json
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from common.fileio import atomic_write_text


def pair_path(output_dir, method: str, dataset: str) -> Path:
    return Path(output_dir) / method / f'{dataset}.json'


def load_done(path: Path, request: Mapping) -> Optional[Dict]:
    """The result stored at ``path`` when it answers ``request`` (compared as JSON), else None."""
    try:
        result = json.loads(Path(path).read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get('mIoU') is None and result.get('images') is None:
        return None
    return result if result.get('request') == json.loads(json.dumps(request)) else None


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    """Mean over the datasets; None unless every one has a number."""
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return None
    return sum(values) / len(values)


def table_rows(results: Mapping[str, Mapping[str, Optional[float]]], methods: Sequence[str],
               datasets: Sequence[str]) -> List[List[Optional[float]]]:
    """results[method][dataset] = mIoU (or None) -> per method its mIoU per dataset, then their mean."""
    rows = []
    for m in methods:
        values = [results.get(m, {}).get(d) for d in datasets]
        rows.append(values + [_mean(values)])
    return rows


def format_markdown(results, methods, datasets, published: Optional[Mapping] = None) -> str:
    """mIoU (%) per method and dataset, and the mean; ``published[method][dataset]``: each paper's number,
    shown after ours in brackets where there is one."""
    def cell(v, p=None):
        text = '–' if v is None else f'{v:.2f}'
        return text + (f' ({p:.1f})' if p is not None else '')

    head = ['method'] + list(datasets) + ['mean']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
    for m, row in zip(methods, table_rows(results, methods, datasets)):
        pub = (published or {}).get(m, {})
        pub_row = [pub.get(d) for d in datasets]
        cells = [cell(v, p) for v, p in zip(row[:-1], pub_row)] + [cell(row[-1], _mean(pub_row))]
        lines.append('| ' + ' | '.join([m] + cells) + ' |')
    note = ('\nmIoU (%) measured here; in brackets the published number of the method\'s paper (CLIP ViT-B/16) where '
            'there is one. The mean is over the datasets of this table, shown when every one has a result.'
            if published else '')
    return '\n'.join(lines) + '\n' + note + ('\n' if note else '')


def format_csv(results, methods, datasets) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(['method'] + list(datasets) + ['mean'])
    for m, row in zip(methods, table_rows(results, methods, datasets)):
        writer.writerow([m] + ['' if v is None else f'{v:.4f}' for v in row])
    return buf.getvalue()


def write_tables(output_dir, results, methods, datasets, published=None) -> List[Path]:
    """DIR/results.md and DIR/results.csv, each written atomically."""
    out = Path(output_dir)
    md, cs = out / 'results.md', out / 'results.csv'
    atomic_write_text(md, format_markdown(results, methods, datasets, published))
    atomic_write_text(cs, format_csv(results, methods, datasets))
    return [md, cs]
