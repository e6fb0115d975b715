"""Both constitution forms load into one type; draws are seeded and recorded."""
import random

import pytest

from selftrain import UserError
from selftrain.constitution import Constitution


def test_rules_load():
    c = Constitution.load("builtin:constitution/rules.yaml")
    assert c.kind == "rules" and len(c.principles) == 16
    assert len({p.id for p in c.principles}) == 16
    assert all(p.critique and p.revision for p in c.principles)
    assert len(c.exemplars) >= 2


def test_values_document_sections_quote_their_text():
    c = Constitution.load("builtin:constitution/values.md")
    assert c.kind == "document" and len(c.principles) >= 8
    for p in c.principles:
        assert "{section}" not in p.critique and len(p.critique) > 200  # the section text is inside
    assert c.preamble


@pytest.mark.parametrize("name", ["general", "control"])
def test_other_arms_load(name):
    c = Constitution.load(f"builtin:constitution/{name}.yaml")
    assert len(c.principles) == 1 and len(c.exemplars) >= 2


def test_draw_is_seeded():
    c = Constitution.load("builtin:constitution/rules.yaml")
    a = [c.draw(random.Random("0:x:0")).id for _ in range(3)]
    b = [c.draw(random.Random("0:x:0")).id for _ in range(3)]
    assert a == b
    ids = {c.draw(random.Random(f"0:{i}")).id for i in range(200)}
    assert len(ids) == 16  # every principle gets drawn


def test_hash_changes_with_content(tmp_path):
    src = Constitution.load("builtin:constitution/general.yaml")
    text = open(src.path).read()
    (tmp_path / "fewshot").mkdir()
    (tmp_path / "fewshot" / "general.yaml").write_text(open(src.path.replace("general.yaml", "fewshot/general.yaml")).read())
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "b.yaml").write_text(text.replace("humanity", "humankind", 1))
    assert Constitution.load(str(tmp_path / "a.yaml")).sha256 == src.sha256
    assert Constitution.load(str(tmp_path / "b.yaml")).sha256 != src.sha256


def test_malformed_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\nprinciples:\n  - id: a\n    critique: [unclosed\n")
    with pytest.raises(UserError, match=r"bad\.yaml: line \d+"):
        Constitution.load(str(f))


def test_missing_key_names_index(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("principles:\n  - {id: a, critique: c, revision: r}\n  - {id: b, critique: c}\n")
    with pytest.raises(UserError, match=r"principles\[1\]: key 'revision'"):
        Constitution.load(str(f))


ARMS = ("rules.yaml", "values.md", "general.yaml", "control.yaml")


def test_values_document_context_quotes_preamble_and_weighing():
    doc = Constitution.load("builtin:constitution/values.md")  # context: document, the default
    sec = Constitution.load("builtin:constitution/values.md", context="section")
    weigh = doc.by_id("weighing-conflicts").text
    for d, s in zip(doc.principles, sec.principles):
        assert s.text in s.critique and doc.preamble not in s.critique and (weigh not in s.critique or
                                                                            s.id == "weighing-conflicts")
        assert doc.preamble in d.critique and d.text in d.critique and d.critique.count(weigh) == 1
        assert doc.preamble in d.revision and weigh in d.revision and d.text == s.text
    # a section alone is what the document used to quote: the same requests as before this setting
    hon = sec.by_id("honesty")
    assert hon.critique.startswith("Here is part of the guidelines you try to live by:\n\nSay only what")


def test_context_section_that_does_not_exist_is_refused(tmp_path):
    text = open(Constitution.load("builtin:constitution/values.md").path).read()
    f = tmp_path / "v.md"
    f.write_text(text.replace("context_sections: [weighing-conflicts]", "context_sections: [weighing]")
                 .replace("fewshot: fewshot/values.yaml\n", ""))
    with pytest.raises(UserError, match=r"v\.md: front matter: key 'context_sections' names section 'weighing'"):
        Constitution.load(str(f), context="section")
    with pytest.raises(UserError, match="constitution.context=whole"):
        Constitution.load("builtin:constitution/values.md", context="whole")


def test_every_arm_shows_the_same_fewshot_transcripts():
    """Same prompts, first answers and final revisions in every arm; only the principle, the
    critique and the requests (each arm's own) differ."""
    arms = {a: Constitution.load(f"builtin:constitution/{a}") for a in ARMS}
    shown = {a: [(e.prompt, e.response, e.revision) for e in c.exemplars] for a, c in arms.items()}
    assert len(set(map(tuple, shown.values()))) == 1 and len(shown["rules.yaml"]) >= 2
    for c in arms.values():
        for e in c.exemplars:
            p = c.by_id(e.principle)
            assert (e.critique_request, e.revision_request) == (p.critique, p.revision)
    crit = {a: [e.critique for e in c.exemplars] for a, c in arms.items()}
    assert len({tuple(v) for v in crit.values()}) == len(ARMS)


class _WordTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def test_footprint_counts_context_and_fewshot_tokens():
    tok = _WordTokenizer()
    doc = Constitution.load("builtin:constitution/values.md").footprint(tok, 2)
    sec = Constitution.load("builtin:constitution/values.md", context="section").footprint(tok, 2)
    rules = Constitution.load("builtin:constitution/rules.yaml").footprint(tok, 2)
    assert doc["context_tokens"] > sec["context_tokens"] > rules["context_tokens"] > 0
    assert doc["fewshot_used"] == 2 and doc["fewshot_tokens"] > sec["fewshot_tokens"] > rules["fewshot_tokens"]
    # the same prompts and first answers: the same hash, whatever the requests quote
    assert doc["fewshot_prompts_sha256"] == sec["fewshot_prompts_sha256"] == rules["fewshot_prompts_sha256"]
    assert Constitution.load("builtin:constitution/rules.yaml").footprint(tok, 1)["fewshot_prompts_sha256"] != \
        rules["fewshot_prompts_sha256"]


def test_exemplar_without_requests_needs_a_known_principle(tmp_path):
    (tmp_path / "fs.yaml").write_text("exemplars:\n  - {prompt: p, response: r, critique: c, revision: v, "
                                      "principle: nope}\n")
    (tmp_path / "c.yaml").write_text("fewshot: fs.yaml\nprinciples:\n  - {id: a, critique: c, revision: r}\n")
    with pytest.raises(UserError, match=r"fs\.yaml: exemplars\[0\]: key 'critique_request' is missing"):
        Constitution.load(str(tmp_path / "c.yaml"))
