"""Preference pairs that selftrain did not make: checked, then converted for DPO.

`preferences.source=dataset` reads a user's pairs (a JSONL file, or a folder written by
`datasets.save_to_disk`) with fields `prompt`, `chosen`, `rejected`: plain strings, or chat
messages as TRL's DPOTrainer reads them. They are checked before any model loads, so a missing
field is one line naming the file, line and field; the label stage then copies them into
gen-k/data/preference, where the contamination guard checks them like any training data.
`check_preference_dataset` is the same check for any saved preference dataset, run before DPO.
"""
from __future__ import annotations

from pathlib import Path

from selftrain import UserError
from selftrain.paths import resolve
from selftrain.run.records import read_user_jsonl, sha256_file, sha256_tree

FIELDS = ("prompt", "chosen", "rejected")
ROLE = {"prompt": "user", "chosen": "assistant", "rejected": "assistant"}


def _messages(value, field: str, where: str) -> list[dict]:
    """A string becomes one message of the field's role; a list must hold {role, content} messages."""
    if isinstance(value, str) and value.strip():
        return [{"role": ROLE[field], "content": value}]
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise UserError(f"{where}: field '{field}' must be a non-empty string or a list of {{role, content}} messages")


def load_user_preferences(path: str) -> tuple[list[dict], str]:
    """The user's pairs as conversational rows, and a hash of the file or folder."""
    file = resolve(path, "preference dataset")
    rows = []
    if file.is_dir():
        check_preference_dataset(file)
        from datasets import load_from_disk

        for i, row in enumerate(load_from_disk(str(file))):
            rows.append({f: _messages(row[f], f, f"{file}: row {i}") for f in FIELDS})
        return rows, sha256_tree(file)
    for lineno, row in read_user_jsonl(file):
        where = f"{file}: line {lineno}"
        missing = [f for f in FIELDS if f not in row]
        if missing:
            raise UserError(f"{where}: preference pair has no '{missing[0]}' field (needs {', '.join(FIELDS)})")
        rows.append({f: _messages(row[f], f, where) for f in FIELDS})
    if not rows:
        raise UserError(f"{file}: no preference pairs")
    return rows, sha256_file(file)


def check_preference_dataset(path: Path) -> None:
    """Refuse a saved preference dataset that DPO cannot read, naming the missing field or row."""
    from datasets import load_from_disk

    path = Path(path)
    if not (path / "dataset_info.json").is_file():
        if (path / "EMPTY").is_file():
            raise UserError(f"{path}: the preference dataset is empty (every pair was dropped)")
        raise UserError(f"{path}: not a saved preference dataset (no dataset_info.json)")
    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # a corrupted folder: datasets raises many types
        raise UserError(f"{path}: cannot load the preference dataset: {str(e).splitlines()[0]}") from e
    for col in FIELDS:
        if col not in ds.column_names:
            raise UserError(f"{path}: preference dataset has no '{col}' field (it has: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise UserError(f"{path}: the preference dataset has no rows")
    for i, row in enumerate(ds.select_columns(list(FIELDS))):
        for col in FIELDS:
            _messages(row[col], col, f"{path}: row {i}")
