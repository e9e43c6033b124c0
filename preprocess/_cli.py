"""Shared plumbing of the preprocessing scripts: logging, summary line, clean errors."""
import json
import logging
import os
import sys
from pathlib import Path



def default_workers() -> int:
    return max(1, (os.cpu_count() or 1) - 1)


def add_common_args(p, what: str = "images"):
    """--workers, --max_samples, --no_progress: the same in every preprocessing script."""
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="worker processes (0 = all in this process). Default: CPU count - 1")
    p.add_argument("--max_samples", type=int, default=None,
                   help=f"stop after writing this many new {what} (testing; rerun to resume)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def run(fn, **kwargs) -> int:
    """Call a builder; print its summary as one ``SUMMARY {json}`` line; bad input -> message + exit code 2."""
    from dataloaders.stores import StoreError
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        summary = fn(**kwargs)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 0
