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
