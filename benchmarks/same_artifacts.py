"""Do two run folders hold the same artifacts? `python -m benchmarks.same_artifacts RUN_A RUN_B`

For checking that a change to the code leaves behaviour alone: run the same config and seed
(greedy, e.g. `selftrain experiment=smoke sampler.temperature=0`) before and after, then compare.
Every file is hashed (samples, critiques, datasets, checkpoints, probe scores, monitor files).
JSON files are compared with what differs between any two runs set aside: wall-clock fields
(seconds, timestamps, tokens/s, the monitor's share), package versions, hosts, and the run
folder's own path. Exit status 0 when every artifact matches, 1 otherwise, with the files that
differ listed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

# JSON keys whose values depend on the machine, the clock or the folder, never on behaviour
VOLATILE = ("second", "time", "timing", "created", "started", "finished", "_at", "host", "pid", "per_s", "wall",
            "duration", "elapsed", "version", "attempt", "boot", "stamp", "date", "node", "platform",
            "_s", "fraction", "share", "peak", "rss", "memory", "path", "error", "run")
SKIP = {"cli.log", ".selftrain.lock"}


def _stable(o, root: Path):
    if isinstance(o, dict):
        return {k: (_outputs(v, root) if k == "outputs" and isinstance(v, dict) else _stable(v, root))
                for k, v in o.items() if not any(s in k.lower() for s in VOLATILE)}
    if isinstance(o, list):
        return [_stable(v, root) for v in o]
    return o


def _outputs(hashes: dict, root: Path) -> dict:
    """A manifest's output hashes, each replaced by this comparison's own digest of that output
    (a drift report or a training log also records how long it took)."""
    out = {}
    for rel in hashes:
        target = root / rel
        files = sorted(f for f in target.rglob("*") if f.is_file()) if target.is_dir() else [target]
        out[rel] = hashlib.sha256("".join(digest(f, root) for f in files if _kept(f)).encode()).hexdigest()
    return out


def _kept(f: Path) -> bool:
    return f.name not in SKIP and f.suffix not in (".html", ".md")


def digest(f: Path, root: Path) -> str:
    data = f.read_bytes().replace(str(root).encode(), b"<RUN>")
    if f.suffix == ".json":
        try:
            data = json.dumps(_stable(json.loads(data), root)).encode()
        except json.JSONDecodeError:
            pass
    return hashlib.sha256(data).hexdigest()


def table(root: Path) -> dict[str, str]:
    """Every artifact under a run folder, by its path inside it. HTML and Markdown renderings
    of reports are left out: they print the timings the JSON keeps apart."""
    return {str(f.relative_to(root)): digest(f, root) for f in sorted(root.rglob("*"))
            if f.is_file() and _kept(f) and ".hydra" not in f.parts and not any(p.startswith("replaced-") for p in f.parts)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.same_artifacts", description=__doc__.split("\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    ta, tb = table(args.a.resolve()), table(args.b.resolve())
    differ = sorted(k for k in ta.keys() & tb.keys() if ta[k] != tb[k])
    missing = sorted(ta.keys() ^ tb.keys())
    print(f"{len(ta)} artifacts in {args.a}, {len(tb)} in {args.b}: "
          f"{len(ta.keys() & tb.keys()) - len(differ)} identical, {len(differ)} differ, {len(missing)} in one only")
    for k in differ:
        print(f"differs: {k}")
    for k in missing:
        print(f"only in {'the first' if k in ta else 'the second'}: {k}")
    return 1 if differ or missing else 0


if __name__ == "__main__":
    sys.exit(main())
