"""Constitutions: a rule list (YAML) or a values document (Markdown), loaded into one type.

Rule list (2022 style): `kind: rules`, `principles: [{id, critique, revision}]`.
Values document (2026 style): YAML front matter (`kind: document`, `critique_request` and
`revision_request` templates holding `{section}`), then sections `## Title {#stable-id}`;
each section becomes one drawable principle whose requests quote the section's text.
Both name a few-shot file of whole critique/revision transcripts (small models need them).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import UserError
from .paths import resolve
from .records import sha256_bytes

MAX_BYTES = 1_000_000  # constitutions are prompts, not corpora
SECTION = re.compile(r"^## (.+?) \{#([a-z0-9][a-z0-9-]*)\}\s*$")
_EXEMPLAR_KEYS = ("prompt", "response", "critique_request", "critique", "revision_request", "revision")


@dataclass(frozen=True)
class Principle:
    id: str
    critique: str  # the critique request
    revision: str  # the revision request
    title: str = ""
    text: str = ""  # a values section's own text (empty for rules); the AI-feedback labeller quotes it


@dataclass(frozen=True)
class Exemplar:
    prompt: str
    response: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str
    principle: str = ""

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt},
                {"role": "assistant", "content": self.response},
                {"role": "user", "content": self.critique_request},
                {"role": "assistant", "content": self.critique},
                {"role": "user", "content": self.revision_request},
                {"role": "assistant", "content": self.revision}]


@dataclass(frozen=True)
class Constitution:
    name: str
    kind: str  # "rules" or "document"
    path: str
    sha256: str  # of the constitution file and its few-shot file together
    principles: tuple[Principle, ...]
    exemplars: tuple[Exemplar, ...]
    preamble: str = ""

    def draw(self, rng: random.Random) -> Principle:
        return self.principles[rng.randrange(len(self.principles))]

    def by_id(self, pid: str) -> Principle:
        return next(p for p in self.principles if p.id == pid)

    @classmethod
    def load(cls, path: str) -> "Constitution":
        file = resolve(path, "constitution file")
        raw = _read(file)
        if file.suffix in (".md", ".markdown"):
            meta, body = _front_matter(file, raw)
            principles, preamble = _sections(file, meta, body)
        else:
            meta = _yaml(file, raw)
            principles, preamble = _rules(file, meta), ""
        kind = meta.get("kind", "document" if file.suffix == ".md" else "rules")
        fewshot_bytes, exemplars = b"", ()
        if meta.get("fewshot"):
            fs = file.parent / str(meta["fewshot"])
            if not fs.is_file():
                raise UserError(f"{file}: key 'fewshot': file not found: {fs}")
            fs_raw = _read(fs)
            fewshot_bytes, exemplars = fs_raw.encode(), _exemplars(fs, _yaml(fs, fs_raw))
        return cls(name=str(meta.get("name", file.stem)), kind=kind, path=str(file),
                   sha256=sha256_bytes(raw.encode() + b"\0" + fewshot_bytes),
                   principles=tuple(principles), exemplars=tuple(exemplars), preamble=preamble)


def _read(file: Path) -> str:
    if not file.is_file():
        raise UserError(f"{file}: not a file")
    if file.stat().st_size > MAX_BYTES:
        raise UserError(f"{file}: larger than {MAX_BYTES} bytes")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def _yaml(file: Path, text: str, line_offset: int = 0) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1 + line_offset}: " if mark else ""
        raise UserError(f"{file}: {where}{getattr(e, 'problem', None) or e}") from e
    if not isinstance(data, dict):
        raise UserError(f"{file}: expected a YAML mapping at the top level")
    return data


def _text(file: Path, where: str, obj: dict, key: str) -> str:
    val = obj.get(key)
    if not isinstance(val, str) or not val.strip():
        raise UserError(f"{file}: {where}: key '{key}' must be a non-empty string")
    return val.strip()


def _rules(file: Path, meta: dict) -> list[Principle]:
    items = meta.get("principles")
    if not isinstance(items, list) or not items:
        raise UserError(f"{file}: key 'principles' must be a non-empty list")
    out, seen = [], set()
    for i, p in enumerate(items):
        where = f"principles[{i}]"
        if not isinstance(p, dict):
            raise UserError(f"{file}: {where}: expected a mapping with id, critique, revision")
        pid = _text(file, where, p, "id")
        if pid in seen:
            raise UserError(f"{file}: {where}: duplicate id '{pid}'")
        seen.add(pid)
        out.append(Principle(pid, _text(file, where, p, "critique"), _text(file, where, p, "revision"),
                             str(p.get("title", pid))))
    return out


def _front_matter(file: Path, raw: str) -> tuple[dict, str]:
    lines = raw.splitlines()
    if not lines or lines[0].strip() != "---":
        raise UserError(f"{file}: line 1: a values document starts with YAML front matter ('---')")
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise UserError(f"{file}: front matter is not closed by a '---' line") from None
    return _yaml(file, "\n".join(lines[1:end]), line_offset=1), "\n".join(lines[end + 1:])


def _sections(file: Path, meta: dict, body: str) -> tuple[list[Principle], str]:
    templates = {}
    for key in ("critique_request", "revision_request"):
        t = _text(file, "front matter", meta, key)
        if t.count("{section}") != 1:
            raise UserError(f"{file}: front matter: key '{key}' must contain '{{section}}' exactly once")
        templates[key] = t
    sections, current, preamble, seen = [], None, [], set()
    for line in body.splitlines():
        m = SECTION.match(line)
        if m:
            if m.group(2) in seen:
                raise UserError(f"{file}: duplicate section id '{m.group(2)}'")
            seen.add(m.group(2))
            current = [m.group(1), m.group(2), []]
            sections.append(current)
        elif line.startswith("## "):
            raise UserError(f"{file}: section heading without a stable id: {line.strip()!r} "
                            "(write '## Title {#some-id}')")
        elif current is None:
            preamble.append(line)
        else:
            current[2].append(line)
    if not sections:
        raise UserError(f"{file}: no sections ('## Title {{#id}}') found")
    out = []
    for title, sid, text_lines in sections:
        text = "\n".join(text_lines).strip()
        if not text:
            raise UserError(f"{file}: section '{sid}' is empty")
        out.append(Principle(sid, templates["critique_request"].replace("{section}", text),
                             templates["revision_request"].replace("{section}", text), title, text))
    return out, "\n".join(preamble).strip()


def _exemplars(file: Path, data: dict) -> list[Exemplar]:
    items = data.get("exemplars")
    if not isinstance(items, list):
        raise UserError(f"{file}: key 'exemplars' must be a list")
    out = []
    for i, ex in enumerate(items):
        if not isinstance(ex, dict):
            raise UserError(f"{file}: exemplars[{i}]: expected a mapping")
        vals = {k: _text(file, f"exemplars[{i}]", ex, k) for k in _EXEMPLAR_KEYS}
        out.append(Exemplar(**vals, principle=str(ex.get("principle", ""))))
    return out
