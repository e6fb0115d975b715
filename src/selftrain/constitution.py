"""Constitutions: a rule list (YAML) or a values document (Markdown), loaded into one type.

Rule list (2022 style): `kind: rules`, `principles: [{id, critique, revision}]`.
Values document (2026 style): YAML front matter (`kind: document`, `critique_request` and
`revision_request` templates holding `{section}`), then sections `## Title {#stable-id}`;
each section becomes one drawable principle whose requests quote it. How much of the
document a request quotes is the run's `constitution.context`:
- `document` (the default): the preamble, the drawn section, and the sections the front
  matter lists in `context_sections` (the shipped document: how to weigh conflicts). A holistic
  document differs from a list of paragraphs in its framing and its priority order; these are
  what a critique needs to weigh one value against another, and they stay a few hundred tokens,
  where quoting the whole document twice a round would multiply the critique stage's context
  for a small model;
- `section`: the drawn section alone (a paragraph-rules reading of the same text).
A rule list's principles stand alone, so `context` does not change them.
Both name a few-shot file of whole critique/revision transcripts (small models need them). An
exemplar may leave out its requests and name its `principle`: it then quotes that principle's
requests as the run draws them, so the transcript always matches the context setting.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from selftrain import UserError
from selftrain.paths import resolve
from selftrain.run.records import sha256_bytes

MAX_BYTES = 1_000_000  # constitutions are prompts, not corpora
SECTION = re.compile(r"^## (.+?) \{#([a-z0-9][a-z0-9-]*)\}\s*$")
CONTEXTS = ("document", "section")  # constitution.context
_EXEMPLAR_KEYS = ("prompt", "response", "critique", "revision")  # always written out
_REQUEST_KEYS = ("critique_request", "revision_request")  # or taken from the named principle


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
    def load(cls, path: str, context: str = "document") -> "Constitution":
        file = resolve(path, "constitution file")
        if context not in CONTEXTS:
            raise UserError(f"constitution.context={context}: must be one of {', '.join(CONTEXTS)}")
        raw = _read(file)
        if file.suffix in (".md", ".markdown"):
            meta, body = _front_matter(file, raw)
            principles, preamble = _sections(file, meta, body, context)
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
            fewshot_bytes, exemplars = fs_raw.encode(), _exemplars(fs, _yaml(fs, fs_raw), principles)
        return cls(name=str(meta.get("name", file.stem)), kind=kind, path=str(file),
                   sha256=sha256_bytes(raw.encode() + b"\0" + fewshot_bytes),
                   principles=tuple(principles), exemplars=tuple(exemplars), preamble=preamble)

    def footprint(self, tokenizer, fewshot: int) -> dict:
        """What a critique round puts in front of the model besides the prompt and its answer, in
        the base model's tokens (message text, no chat template): the constitution's requests
        (mean over drawable principles, critique + revision request) and the few-shot transcripts
        used. Recorded per run, so a comparison can show how much text each arm adds; the hash
        of the few-shot prompts and first answers lets it check that every arm shows the same."""
        def n(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        per = [n(p.critique) + n(p.revision) for p in self.principles]
        used = self.exemplars[:fewshot]
        shown = json.dumps([[ex.prompt, ex.response] for ex in used])
        return {"context_tokens": float(sum(per) / len(per)), "context_tokens_range": [min(per), max(per)],
                "fewshot_used": len(used),
                "fewshot_tokens": sum(n(m["content"]) for ex in used for m in ex.messages()),
                "fewshot_prompts_sha256": sha256_bytes(shown.encode())}


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


def _sections(file: Path, meta: dict, body: str, context: str) -> tuple[list[Principle], str]:
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
    texts = {}
    for title, sid, text_lines in sections:
        texts[sid] = (title, "\n".join(text_lines).strip())
        if not texts[sid][1]:
            raise UserError(f"{file}: section '{sid}' is empty")
    shared = meta.get("context_sections", [])
    if not isinstance(shared, list) or not all(isinstance(x, str) for x in shared):
        raise UserError(f"{file}: front matter: key 'context_sections' must be a list of section ids")
    for sid in shared:
        if sid not in texts:
            raise UserError(f"{file}: front matter: key 'context_sections' names section '{sid}', which this "
                            f"document does not have (its sections: {', '.join(texts)})")
    intro = "\n".join(preamble).strip()

    def quoted(sid: str) -> str:
        if context == "section":
            return texts[sid][1]
        parts = [intro] if intro else []
        parts += [f"## {texts[s][0]}\n\n{texts[s][1]}" for s in [sid, *(x for x in shared if x != sid)]]
        return "\n\n".join(parts)

    out = [Principle(sid, templates["critique_request"].replace("{section}", quoted(sid)),
                     templates["revision_request"].replace("{section}", quoted(sid)), title, text)
           for sid, (title, text) in texts.items()]
    return out, intro


def _exemplars(file: Path, data: dict, principles: list[Principle]) -> list[Exemplar]:
    items = data.get("exemplars")
    if not isinstance(items, list):
        raise UserError(f"{file}: key 'exemplars' must be a list")
    by_id = {p.id: p for p in principles}
    out = []
    for i, ex in enumerate(items):
        where = f"exemplars[{i}]"
        if not isinstance(ex, dict):
            raise UserError(f"{file}: {where}: expected a mapping")
        vals = {k: _text(file, where, ex, k) for k in _EXEMPLAR_KEYS}
        pid = str(ex.get("principle", ""))
        for key in _REQUEST_KEYS:
            if ex.get(key) is not None:
                vals[key] = _text(file, where, ex, key)
            elif pid in by_id:  # the principle's request as the run draws it (context included)
                p = by_id[pid]
                vals[key] = p.critique if key == "critique_request" else p.revision
            else:
                raise UserError(f"{file}: {where}: key '{key}' is missing and key 'principle' "
                                f"({pid or 'not set'}) names no principle of the constitution to take it from")
        out.append(Exemplar(**vals, principle=pid))
    return out
