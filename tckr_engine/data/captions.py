"""Captions files (JSONL, one line per real training image) and the per-class prompt lists built from them.

Line format, as written by `tckr-engine caption`:
`{"index": 12, "class_index": 3, "class_name": "Dress", "caption": "...", "prompt": "Dress: ..."}`.
Class indices must agree with the dataset's own indexing, checked by name (a sorted-names re-indexing
is the pitfall TCKR's code hit; REFERENCE.md §1).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tckr_engine.errors import TckrError


@dataclass(frozen=True)
class Prompt:
    """One conditioning text: the full prompt and the caption it was built from ("" for templates)."""

    text: str
    caption: str = ""


def captions_digest(path: str | Path) -> str:
    p = Path(path)
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError as e:
        raise TckrError(
            f"cannot read captions file {p}: {e.strerror}; pass the JSONL from 'tckr-engine caption'"
        ) from None


def _rows(path: str | Path, classes: Sequence[str]) -> list[tuple[int, dict, int]]:
    """Validated (line number, row, class position) triples of a captions file."""
    p = Path(path)
    if not p.is_file():
        if p.is_dir():
            raise TckrError(
                f"{p} is a folder, not a captions file; pass the file 'tckr-engine caption' wrote"
            )
        raise TckrError(f"captions file not found: {p}; create it with 'tckr-engine caption'")
    position = {name: i for i, name in enumerate(classes)}
    try:
        lines = list(enumerate(p.read_text(encoding="utf-8").splitlines(), start=1))
    except UnicodeDecodeError:
        raise TckrError(f"captions file {p} is not UTF-8 text") from None
    rows = []
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, prompt = row["class_name"], row["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TckrError(
                f"captions file {p}, line {lineno}: expected a JSON object with class_name and prompt"
            ) from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise TckrError(f"captions file {p}, line {lineno}: empty prompt")
        if name not in position:
            raise TckrError(
                f"captions file {p}, line {lineno}: unknown class name {name!r}; the dataset's classes are "
                f"{', '.join(classes)}"
            )
        if "class_index" in row and row["class_index"] != position[name]:
            raise TckrError(
                f"captions file {p}, line {lineno}: class_index {row['class_index']} for {name!r}, but the "
                f"dataset indexes it as {position[name]}; regenerate the captions for this dataset"
            )
        rows.append((lineno, row, position[name]))
    return rows


def read_captions(path: str | Path, classes: Sequence[str]) -> list[list[Prompt]]:
    """Per-class prompt lists (in file order) from a captions JSONL file."""
    per_class: list[list[Prompt]] = [[] for _ in classes]
    for _, row, c in _rows(path, classes):
        per_class[c].append(Prompt(row["prompt"], str(row.get("caption", ""))))
    missing = [classes[i] for i, plist in enumerate(per_class) if not plist]
    if missing:
        raise TckrError(f"captions file {path} has no caption for class(es): {', '.join(missing)}")
    return per_class


def read_captions_per_image(path: str | Path, classes: Sequence[str], labels: Sequence[int]) -> list[str]:
    """The prompt of every training image, by the `index` field; each must agree with the image's label."""
    prompts: list[str | None] = [None] * len(labels)
    for lineno, row, c in _rows(path, classes):
        i = row.get("index")
        if not isinstance(i, int) or not 0 <= i < len(labels):
            raise TckrError(
                f"captions file {path}, line {lineno}: index {i!r} outside the {len(labels)} images"
            )
        if int(labels[i]) != c:
            raise TckrError(
                f"captions file {path}, line {lineno}: image {i} is a {classes[int(labels[i])]!r}, "
                f"the caption says {classes[c]!r}; were the captions made for another dataset?"
            )
        prompts[i] = row["prompt"]
    missing = sum(p is None for p in prompts)
    if missing:
        raise TckrError(f"captions file {path} has no caption for {missing} of {len(labels)} images")
    return prompts  # type: ignore[return-value]


def template_prompts(classes: Sequence[str], template: str) -> list[list[Prompt]]:
    """One prompt per class from a template such as "{name}" or "a photo of a {name}"."""
    return [[Prompt(template.replace("{name}", name))] for name in classes]
