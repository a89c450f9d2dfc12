"""Class labels as shards carry them (`.cls`: an ASCII int), checked, and the class list they imply.

A label is an index into the class names. Without a class file the names are "0" .. str(max label), as
long as that list stays small; a sparse set of large labels (e.g. WordNet ids used as ints) keeps the
labels it actually has, as names, so memory follows the data and never the largest number in it.
"""

from __future__ import annotations

MAX_LABEL = 2**31 - 1  # .cls values above are refused: labels are stored as int64 but trained as int32
DENSE_CLASSES = 100_000  # up to this many classes the names are "0" .. str(max); above, the labels seen


def parse_cls(raw) -> tuple[int | None, str | None]:
    """(label, None) for a valid `.cls` payload (bytes or str), else (None, why)."""
    text = raw.decode("ascii", errors="replace") if isinstance(raw, (bytes, bytearray, memoryview)) else str(raw)
    text = text.strip()
    if not text.isdigit() or len(text) > len(str(MAX_LABEL)):
        if text.startswith("-") and text[1:].isdigit():
            return None, f"bad .cls {text[:20]}: labels must be >= 0"
        if text.isdigit():
            return None, f"bad .cls {text[:24]}: labels above {MAX_LABEL} are not accepted"
        return None, f"bad .cls {text[:20]!r}: expected an ASCII int"
    label = int(text)
    if label > MAX_LABEL:
        return None, f"bad .cls {label}: labels above {MAX_LABEL} are not accepted"
    return label, None


def class_names_for(labels: list[int]) -> tuple[list[str], list[int]]:
    """(class names, labels as indices into them) for labels without a class file; negative labels (unknown)
    are kept as they are."""
    valid = [label for label in labels if label >= 0]
    if not valid:
        return [], list(labels)
    if max(valid) < DENSE_CLASSES:
        return [str(i) for i in range(max(valid) + 1)], list(labels)
    seen = sorted(set(valid))
    index = {label: i for i, label in enumerate(seen)}
    return [str(label) for label in seen], [index[label] if label >= 0 else label for label in labels]
