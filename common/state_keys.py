"""Comparing the tensor names (and shapes) a model expects with those a file holds: one diff, one wording, used by
checkpoint loading, resuming and the download check. Knows no model and needs no torch (shapes are read with
``getattr(v, 'shape')``)."""
from dataclasses import dataclass, field
from typing import Iterable, List, Mapping, Union

Keys = Union[Mapping[str, object], Iterable[str]]


@dataclass
class KeyDiff:
    missing: List[str] = field(default_factory=list)      # expected, not found
    unexpected: List[str] = field(default_factory=list)   # found, not expected
    misshaped: List[str] = field(default_factory=list)    # "name: found (…) vs expected (…)"

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def describe(self, limit: int = 8) -> str:
        """'2 missing keys: a, b; 1 mis-shaped tensor: c: file (3,) vs model (4,)' (at most ``limit`` names each)."""
        def show(items):
            return ", ".join(items[:limit]) + (f" ... (+{len(items) - limit} more)" if len(items) > limit else "")
        parts = []
        for items, what in ((self.missing, "missing key"), (self.unexpected, "unexpected key"),
                            (self.misshaped, "mis-shaped tensor")):
            if items:
                parts.append(f"{len(items)} {what}{'s' if len(items) > 1 else ''}: {show(items)}")
        return "; ".join(parts)


def diff_keys(expected: Keys, found: Keys, found_name: str = "file", expected_name: str = "model") -> KeyDiff:
    """Names in ``expected`` but not ``found`` and the reverse; where both are mappings of tensors, the names
    whose shapes differ too."""
    exp = expected if isinstance(expected, Mapping) else dict.fromkeys(expected)
    got = found if isinstance(found, Mapping) else dict.fromkeys(found)
    misshaped = []
    for k, v in exp.items():
        a, b = getattr(v, "shape", None), getattr(got.get(k), "shape", None)
        if a is not None and b is not None and tuple(a) != tuple(b):
            misshaped.append(f"{k}: {found_name} {tuple(b)} vs {expected_name} {tuple(a)}")
    return KeyDiff(missing=sorted(set(exp) - set(got)), unexpected=sorted(set(got) - set(exp)), misshaped=misshaped)
