"""The contamination guard fails when a probe item reaches training data, and only then."""
import pytest
from datasets import Dataset

from selftrain import UserError
from selftrain.stages.guard import Guard, check
from selftrain.monitor.suites import load_suite


def _data(tmp_path, answers):
    rows = [{"prompt_id": str(i), "messages": [{"role": "user", "content": f"Ordinary question {i}?"},
                                               {"role": "assistant", "content": a}]} for i, a in enumerate(answers)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "sft"))
    pref = [{"prompt_id": str(i), "prompt": [{"role": "user", "content": f"Ordinary question {i}?"}],
             "chosen": [{"role": "assistant", "content": a}], "rejected": [{"role": "assistant", "content": "no"}]}
            for i, a in enumerate(answers)]
    Dataset.from_list(pref).save_to_disk(str(tmp_path / "preference"))
    return tmp_path


def test_clean_data_passes(tmp_path):
    suite = load_suite("builtin:probes/suites/default")
    n = check(_data(tmp_path, ["Paris is the capital of France.", "Boil the pasta for ten minutes."]), suite.texts())
    assert n == 2 * 2 + 2 * 3


def test_exact_probe_item_fails(tmp_path):
    suite = load_suite("builtin:probes/suites/default")
    leaked = next(it for it in suite.items if it.kind == "contrast").aligned
    with pytest.raises(UserError, match="probe item found in training data"):
        check(_data(tmp_path, ["A fine answer.", leaked]), suite.texts())


def test_near_duplicate_and_embedded_copy_fail(tmp_path):
    suite = load_suite("builtin:probes/suites/default")
    item = next(it for it in suite.items if it.kind == "contrast" and len(it.prompt.split()) > 12)
    g = Guard(suite.texts())
    near = item.prompt.upper().replace(",", "") + "!!"
    assert g.match(near) == item.prompt
    embedded = "Here is a question someone asked me: " + item.prompt + " I answered it carefully."
    assert g.match(embedded) == item.prompt
    assert g.match("Completely unrelated words about gardening tomatoes in the summer sun today.") is None


def test_training_prompts_do_not_copy_probe_items():
    """The shipped prompt sets and the shipped probe suite are disjoint."""
    import json

    from selftrain.paths import resolve

    g = Guard(load_suite("builtin:probes/suites/default").texts())
    for name in ("red_team", "helpful"):
        for line in open(resolve(f"builtin:prompts/{name}.jsonl")):
            p = json.loads(line)["prompt"]
            assert g.match(p) is None, p
