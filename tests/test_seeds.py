"""selftrain.run.seeds: every named seed equals the formula runs have always used, and the
sampling seeds of one generation never coincide."""
import itertools

from selftrain.run import seeds

RUN_SEEDS = range(0, 50)
GENERATIONS = range(0, 30)


def test_named_seeds_equal_the_formulas_runs_have_always_used():
    for s, k in itertools.product(RUN_SEEDS, GENERATIONS):
        assert seeds.probe(s, k) == s * 100 + k
        assert seeds.sample(s, k) == s * 100 + k
        assert seeds.critique(s, k) == s * 100 + k + 1
        assert seeds.revision(s, k) == s * 100 + k + 2
        assert seeds.label_response(s, k) == s * 100 + k + 3
        assert seeds.label_cot(s, k) == s * 100 + k + 4
        assert seeds.draw(s, k) == s + k
        assert seeds.train(s, k) == s + k
        assert seeds.checkpoint(s, k) == s + k
        assert seeds.child(s, k) == s + 1 + k
    for base, i in itertools.product((0, 7, 4203), range(200)):
        assert seeds.revision_round(base, i) == base + 7919 * i
        assert seeds.chunk(base, i) == base * 100_003 + i
        assert seeds.batch(base, i) == base * 1_000_003 + i
        assert seeds.request(base, i) == base * 1_000_003 + i  # the server engines' per-request seed


def test_a_generations_sampling_seeds_are_pairwise_distinct():
    named = (seeds.sample, seeds.critique, seeds.revision, seeds.label_response, seeds.label_cot)
    for s, k in itertools.product(RUN_SEEDS, GENERATIONS):
        got = [f(s, k) for f in named]
        assert len(set(got)) == len(got), (s, k, got)


def test_round_chunk_and_batch_seeds_never_collide_within_a_run():
    # every (stage seed, round, chunk, batch) of one run seed and generation gives its own torch seed
    for s, k in itertools.product((0, 3), range(4)):
        stage = [seeds.sample(s, k), seeds.critique(s, k), seeds.revision(s, k)]
        got = [seeds.batch(seeds.chunk(seeds.revision_round(b, r), i), j)
               for b in stage for r in range(3) for i in range(20) for j in range(8)
               if r == 0 or b != stage[0]]
        assert len(set(got)) == len(got)
        assert len({seeds.chunk(b, i) for b in stage for i in range(500)}) == 3 * 500


def test_probes_of_a_validation_run_are_pairwise_distinct():
    for s in RUN_SEEDS:
        got = [s] + [seeds.child(s, i) for i in range(100)]  # the reference probes with the seed itself
        assert len(set(got)) == len(got)
