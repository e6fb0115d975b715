"""The whole smoke experiment as a user runs it (a subprocess of the real CLI): wall time, peak
memory, each generation's stage seconds and tokens/s, and the monitor's share of a generation
(all read back from the run's manifests)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


# The CLI, then the process's peak resident memory written to a file however it exits.
_CHILD = """
import atexit, re
def _peak():
    m = re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())
    open({peak_file!r}, "w").write(m.group(1) if m else "0")
atexit.register(_peak)
from selftrain.cli import main
main()
"""


def run(out: Path, model: str | None, overrides: list[str], experiment: str = "smoke") -> dict:
    run_dir = Path(out) / f"{experiment}-run"
    peak_file = Path(out) / f"{experiment}-peak-rss.txt"
    args = [sys.executable, "-c", _CHILD.format(peak_file=str(peak_file)), f"experiment={experiment}",
            f"hydra.run.dir={run_dir}", *([f"model.name_or_path={model}"] if model else []), *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    # The child's own high-water mark (VmHWM, KiB), written as it exits. Not RUSAGE_CHILDREN: a
    # child forked from this process counts this process's memory at the fork (13.8 GiB once,
    # after the SFT section, against 4.8 GB for the smoke run itself).
    peak_kib = int(peak_file.read_text()) if peak_file.exists() else 0
    res = {"experiment": experiment, "command": " ".join(["selftrain"] + args[3:]), "returncode": proc.returncode,
           "wall_s": round(wall, 2), "peak_rss_mib": round(peak_kib / 1024, 1)}
    if proc.returncode != 0:
        res["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        return res
    gens = {}
    for g in sorted(run_dir.glob("gen-*")):
        m = json.loads((g / "manifest.json").read_text())
        gens[g.name] = {
            "wall_s": m.get("wall_s"), "monitor_s": m.get("monitor_s"), "monitor_fraction": m.get("monitor_fraction"),
            "stages": {name: {"seconds": st.get("seconds"),
                              **{k: v for k, v in st.get("counts", {}).items() if k in ("new_tokens", "tokens_per_s")}}
                       for name, st in m.get("stages", {}).items()}}
    res["generations"] = gens
    # a generation that trained (every one but the last) is the unit the monitor's share is judged on
    trained = [v["monitor_fraction"] for v in gens.values() if "train" in v["stages"] and v["monitor_fraction"]]
    res["monitor_fraction_of_generation"] = max(trained) if trained else None
    # the data screen (part of the monitor's share) and the one-off steering check at gen-000
    screen = [v["stages"]["screen"]["seconds"] / sum(st["seconds"] or 0 for st in v["stages"].values())
              for v in gens.values() if "screen" in v["stages"] and "train" in v["stages"]]
    res["screen_fraction_of_generation"] = round(max(screen), 4) if screen else None
    g0 = run_dir / "gen-000" / "manifest.json"
    if g0.is_file():
        probe = json.loads(g0.read_text()).get("stages", {}).get("probe", {})
        res["steering_s"] = probe.get("counts", {}).get("steering_s")
        res["probe_s_gen0"] = probe.get("seconds")
    return res
