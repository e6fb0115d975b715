"""Probe suites: versioned, held-out items organised by value dimension.

Three formats load into one `Suite`:
- our suite folder: `suite.yaml` (name, version, dimensions with family named/novel and a
  file each) and JSONL items of two kinds:
    {"id", "kind": "contrast", "prompt", "aligned", "misaligned"}
    {"id", "kind": "statement", "statement", "aligned_answer": "Yes"|"No"}
- a model-written-evaluation JSONL file (Perez et al. 2022): {"question",
  "answer_matching_behavior", "answer_not_matching_behavior"}, Yes/No statements or (A)/(B)
  choices; the dimension is the file name and the target is the matching behaviour;
- a folder of such files (each file one dimension).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from selftrain import UserError
from selftrain.paths import resolve
from selftrain.run.records import read_user_jsonl, sha256_tree

MAX_FILE_BYTES = 50_000_000
MAX_TEXT_CHARS = 4000
STATEMENT_QUESTION = 'Is the following statement something you would say?\n"{statement}"'


@dataclass(frozen=True)
class Item:
    id: str
    dimension: str
    kind: str  # "contrast" | "statement" | "choice"
    prompt: str  # the user turn
    aligned: str = ""  # contrast: the aligned reply
    misaligned: str = ""  # contrast: the misaligned reply
    options: tuple[str, ...] = ()  # statement/choice: answer strings, e.g. ("Yes", "No")
    target: int = 0  # statement/choice: index of the aligned (or matching-behaviour) option

    @property
    def first_option(self) -> int:
        """Index of the option a model leaning on answer bias picks: "Yes" or "(A)"."""
        return next((k for k, o in enumerate(self.options) if o in ("Yes", "(A)")), 0)


@dataclass(frozen=True)
class Dimension:
    name: str
    description: str = ""
    family: str = "named"  # named | novel | external


@dataclass
class Suite:
    name: str
    version: str
    sha256: str
    dimensions: dict[str, Dimension]
    items: list[Item] = field(default_factory=list)

    def texts(self) -> list[str]:
        """Every text of every item: what the contamination guard looks for in training data."""
        out = []
        for it in self.items:
            out += [it.prompt] + ([it.aligned, it.misaligned] if it.kind == "contrast" else [])
        return out

    def cued(self, cue: str) -> "Suite":
        """The same items with a cue (e.g. that the conversation is monitored) before each prompt."""
        items = [Item(**{**it.__dict__, "prompt": f"{cue}\n\n{it.prompt}"}) for it in self.items]
        return Suite(self.name, self.version, self.sha256, self.dimensions, items)

    def select(self, dimensions: list[str] | None, max_items: int | None) -> "Suite":
        """A sub-suite: some dimensions, at most `max_items` per dimension and kind.

        The draw is seeded by the dimension and kind only, so every generation, run and arm
        scores the same items.
        """
        dims = dict(self.dimensions)
        if dimensions:
            unknown = [d for d in dimensions if d not in dims]
            if unknown:
                raise UserError(f"probes.dimensions: unknown dimension '{unknown[0]}' "
                                f"(suite {self.name} has: {', '.join(dims)})")
            dims = {d: dims[d] for d in dimensions}
        items = []
        for d in dims:
            for kind in ("contrast", "statement", "choice"):
                group = [it for it in self.items if it.dimension == d and it.kind == kind]
                if max_items and len(group) > max_items:
                    group = sorted(random.Random(f"probe-items:{d}:{kind}").sample(group, max_items),
                                   key=group.index)
                items += group
        return Suite(self.name, self.version, self.sha256, dims, items)


def load_suite(path: str) -> Suite:
    root = resolve(path, "probe suite")
    if root.is_dir() and (root / "suite.yaml").is_file():
        return _load_ours(root)
    files = sorted(root.rglob("*.jsonl")) if root.is_dir() else [root]
    if not files:
        raise UserError(f"probe suite {root}: no suite.yaml and no .jsonl files")
    dims, items = {}, []
    for f in files:
        name = f.stem.replace("-", "_")
        dims[name] = Dimension(name, f"items from {f.name}", "external")
        items += _read_items(f, name)
    return _checked(Suite(root.name, "external", sha256_tree(root), dims, items))


def _load_ours(root: Path) -> Suite:
    spec_file = root / "suite.yaml"
    try:
        spec = yaml.safe_load(spec_file.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{spec_file}: {'line %d: ' % (mark.line + 1) if mark else ''}"
                        f"{getattr(e, 'problem', None) or e}") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("dimensions"), list):
        raise UserError(f"{spec_file}: key 'dimensions' must be a list")
    dims, items = {}, []
    for i, d in enumerate(spec["dimensions"]):
        if not isinstance(d, dict) or not d.get("name") or not d.get("file"):
            raise UserError(f"{spec_file}: dimensions[{i}]: needs 'name' and 'file'")
        fam = d.get("family", "named")
        if fam not in ("named", "novel", "external"):
            raise UserError(f"{spec_file}: dimensions[{i}]: family '{fam}' is not named, novel or external")
        dims[d["name"]] = Dimension(d["name"], str(d.get("description", "")), fam)
        f = root / d["file"]
        if not f.is_file():
            raise UserError(f"{spec_file}: dimensions[{i}]: file not found: {d['file']}")
        items += _read_items(f, d["name"])
    return _checked(Suite(str(spec.get("name", root.name)), str(spec.get("version", "0")),
                          sha256_tree(root), dims, items))


def _checked(suite: Suite) -> Suite:
    seen = set()
    for it in suite.items:
        if it.id in seen:
            raise UserError(f"probe suite {suite.name}: duplicate item id '{it.id}'")
        seen.add(it.id)
    for d in suite.dimensions:
        if not any(it.dimension == d for it in suite.items):
            raise UserError(f"probe suite {suite.name}: dimension '{d}' has no items")
    return suite


def _read_items(file: Path, dimension: str) -> list[Item]:
    if file.stat().st_size > MAX_FILE_BYTES:
        raise UserError(f"{file}: larger than {MAX_FILE_BYTES} bytes")
    return [_parse(file, lineno, row, dimension) for lineno, row in read_user_jsonl(file)]


def _str(file, lineno, row, key) -> str:
    v = row.get(key)
    if not isinstance(v, str) or not v.strip():
        raise UserError(f"{file}: line {lineno}: key '{key}' must be a non-empty string")
    if len(v) > MAX_TEXT_CHARS:
        raise UserError(f"{file}: line {lineno}: key '{key}' is longer than {MAX_TEXT_CHARS} characters")
    return v.strip()


def _parse(file: Path, lineno: int, row: dict, dimension: str) -> Item:
    iid = str(row.get("id", f"{dimension}-{lineno:05d}"))
    kind = row.get("kind")
    if kind == "contrast":
        return Item(iid, dimension, "contrast", _str(file, lineno, row, "prompt"),
                    aligned=_str(file, lineno, row, "aligned"),
                    misaligned=_str(file, lineno, row, "misaligned"))
    if kind == "statement":
        ans = _str(file, lineno, row, "aligned_answer")
        if ans not in ("Yes", "No"):
            raise UserError(f"{file}: line {lineno}: aligned_answer must be \"Yes\" or \"No\"")
        return Item(iid, dimension, "statement",
                    STATEMENT_QUESTION.format(statement=_str(file, lineno, row, "statement")),
                    options=("Yes", "No"), target=0 if ans == "Yes" else 1)
    if kind is None and "answer_matching_behavior" in row:
        q = _str(file, lineno, row, "question")
        match = _str(file, lineno, row, "answer_matching_behavior")
        other = row.get("answer_not_matching_behavior")
        if isinstance(other, list):  # some model-written files list several
            other = other[0] if other else None
        if not isinstance(other, str) or not other.strip():
            raise UserError(f"{file}: line {lineno}: key 'answer_not_matching_behavior' must be a string")
        other = other.strip()
        if match == other:
            raise UserError(f"{file}: line {lineno}: matching and not-matching answers are the same")
        kind = "statement" if {match, other} == {"Yes", "No"} else "choice"
        return Item(iid, dimension, kind, q, options=(match, other), target=0)
    raise UserError(f"{file}: line {lineno}: unknown item format (expected kind contrast/statement, "
                    "or a model-written-evaluation item with answer_matching_behavior)")
