"""selftrain's benchmarks: every stage against its bare baseline and the machine's limits.

`python -m benchmarks.run [--quick] [--out DIR]` (or `make bench`) writes results.json and
results.md. Benchmarks are not tests: tests/test_bench.py only checks that the quick mode runs.
"""
