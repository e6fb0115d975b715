"""Building training data: filters count their drops; one row per kept prompt."""
from datasets import load_from_disk

from selftrain.stages.critique import clean
from selftrain.stages.data import build_datasets
from selftrain.text import verdict


def rec(pid, initial, final):
    return {"prompt_id": pid, "prompt": f"prompt {pid}", "response": initial, "final": final, "rounds": []}


def test_verdicts():
    assert verdict("a b c d", "", 3, 0.3) == "empty"
    assert verdict("x", "the cat sat the cat sat the cat sat the cat sat", 3, 0.3) == "degenerate"
    assert verdict("I will help you.", "i will help you", 3, 0.3) == "unchanged"
    assert verdict("Sure, here is how.", "I can't help with that, but here is a safer option.", 3, 0.3) == "kept"


def test_build_datasets_counts_and_rows(tmp_path):
    recs = [rec("a", "Sure, here's how to do it.", "I won't help with that, but I can suggest a safer option."),
            rec("b", "Hello there", ""),
            rec("c", "Same answer here.", "Same answer here"),
            rec("d", "x", "go go go go go go go go go go go go"),
            rec("e", "Bad first answer.", "A better answer that explains the reasons clearly.")]
    counts = build_datasets(recs, tmp_path, min_words=3, max_top_trigram_share=0.3)
    assert counts == {"records": 5, "kept": 2, "dropped_empty": 1, "dropped_degenerate": 1, "dropped_unchanged": 1}
    sft = load_from_disk(str(tmp_path / "sft"))
    pref = load_from_disk(str(tmp_path / "preference"))
    assert sft["prompt_id"] == ["a", "e"] == pref["prompt_id"]
    assert sft[0]["messages"][1] == {"role": "assistant", "content": recs[0]["final"]}
    assert pref[1]["chosen"][0]["content"] == recs[4]["final"]
    assert pref[1]["rejected"][0]["content"] == recs[4]["response"]


def test_clean_strips_labels():
    assert clean("Revision: Here it is.") == "Here it is."
    assert clean("**Critique:** too vague") == "too vague"


def _cfg(method: str, source: str):
    from types import SimpleNamespace as NS

    return NS(train=NS(method=method), preferences=NS(source=source),
              data=NS(min_words=3, max_top_trigram_share=0.3))


def test_run_data_owns_data_preference_only_without_a_label_stage(tmp_path):
    """The stage contract: run_data reads gen-k/critiques.jsonl and writes what `outputs` names, nothing else."""
    import pytest

    from selftrain import UserError
    from selftrain.run.layout import GenDir
    from selftrain.run.records import write_jsonl
    from selftrain.stages import data

    good = rec("a", "Sure, here's how to do it.", "I won't help with that, but I can suggest a safer option.")
    for method, source, owns_pref in (("sft", "revision", True), ("sft_dpo", "revision", True),
                                      ("sft_dpo", "ai_feedback", False)):
        gen = GenDir(tmp_path / f"{method}-{source}", 0)
        write_jsonl(gen.critiques, [good])
        cfg = _cfg(method, source)
        assert data.outputs(gen, cfg) == [gen.sft] + ([gen.preference] if owns_pref else [])
        assert data.run_data(gen, cfg)["kept"] == 1
        assert gen.sft.is_dir() and gen.preference.exists() == owns_pref
    gen = GenDir(tmp_path / "none", 0)
    write_jsonl(gen.critiques, [rec("b", "Hello there", "")])
    with pytest.raises(UserError, match="generation 0: every revision was dropped"):
        data.run_data(gen, _cfg("sft", "revision"))
