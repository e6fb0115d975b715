"""A short check of selftrain on one GPU: the loop end to end, the sampler against bare
`generate`, and the probe scorer, all with the model on CUDA.

    python -m benchmarks.gpucheck --model PATH                 # a checkpoint folder
    python -m benchmarks.gpucheck --random-init CONFIG_DIR     # config + tokenizer files only

`--random-init` builds a seeded random model from a folder holding config.json and the
tokenizer files (for machines the weights cannot reach); its text is noise, but every code
path (placement, bf16 training, our decoding loop, probes, drift) is the real one. Writes
gpucheck.json (and the loop's log) to --out. Not a test: CI has no GPU. Results from an H100
are in the README (Scaling up: On a GPU).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path


def random_model(config_dir: Path, out: Path) -> Path:
    """A seeded random float32 model with `config_dir`'s config, tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(config_dir)), dtype=torch.float32)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(config_dir)).save_pretrained(str(out))
    for name in ("chat_template.jinja", "generation_config.json"):  # save_pretrained writes defaults
        if (config_dir / name).exists():
            shutil.copy2(config_dir / name, out / name)
    return out


def loop(model: str, out: Path) -> dict:
    """The smoke experiment on the GPU, bf16 training, the embedding instrument off (its encoder is
    a separate package and runs on the CPU by design)."""
    run = out / "run"
    cmd = [sys.executable, "-c", "import sys; from selftrain.cli import main; sys.argv[0] = 'selftrain'; main()",
           "experiment=smoke", f"model.name_or_path={model}", "monitor.embedding=false", "train.sft.bf16=true",
           "sampler.batch_size=64", f"hydra.run.dir={run}"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    (out / "loop.log").write_text(p.stdout[-200_000:] + "\n--- stderr\n" + p.stderr[-400_000:])
    if p.returncode:
        raise RuntimeError(f"the loop exited {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
    res = {}
    for g in sorted(run.glob("gen-*")):
        m = json.loads((g / "manifest.json").read_text())
        st = m.get("stages", {})
        res[g.name] = {"status": m.get("status"), "wall_s": m.get("wall_s"),
                       "seconds": {k: v.get("seconds") for k, v in st.items()},
                       "sampler_device": st.get("sample", {}).get("counts", {}).get("sampler", {}).get("device"),
                       "relative_l2": st.get("train", {}).get("counts", {}).get("relative_l2")}
    return res


def bench(model_path: str, rounds: int = 2) -> dict:
    """Pipeline sampling against bare batched generate, interleaved, at batches 128 and 512."""
    import torch

    from benchmarks import common, sampling
    from selftrain.models import load_model, load_tokenizer
    from selftrain.engines.base import SamplingParams

    model, tok = load_model(model_path, device="auto"), load_tokenizer(model_path)
    res = {"device": str(model.device)}
    for b in (128, 512):
        prompts = common.prompts(b)
        p = SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.95, repetition_penalty=1.1, seed=0)
        warm = SamplingParams(**{**p.__dict__, "max_new_tokens": 4})
        arms = {"pipeline": sampling.pipeline_arm, "bare": sampling.bare_arm}
        for f in arms.values():
            f(model, tok, prompts, warm, b)
        tps = {k: [] for k in arms}
        for _ in range(rounds):
            for k, f in arms.items():
                torch.cuda.synchronize()
                a = f(model, tok, prompts, p, b)
                torch.cuda.synchronize()
                tps[k].append(round(a["new_tokens"] / a["seconds"]))
        res[f"batch_{b}"] = {**tps, "ratio_of_medians": round(common.median(tps["pipeline"]) /
                                                              common.median(tps["bare"]), 3)}
    return res


def probes(model_path: str) -> dict:
    """The default suite's scores and activations on the GPU equal the CPU's."""
    import numpy as np

    from selftrain.models import load_model, load_tokenizer
    from selftrain.monitor.behavioural import score_suite
    from selftrain.monitor.suites import load_suite

    tok = load_tokenizer(model_path)
    suite = load_suite("builtin:probes/suites/default").select(None, 6)
    gpu_rows, gpu_acts = score_suite(load_model(model_path, device="auto"), tok, suite, 16, states=True)
    cpu_rows, cpu_acts = score_suite(load_model(model_path), tok, suite, 16, states=True)
    return {"items": len(gpu_rows),
            "max_score_diff": max(abs(a["score"] - b["score"]) for a, b in zip(gpu_rows, cpu_rows)),
            "max_state_rel_diff": float(np.abs(gpu_acts["pos"] - cpu_acts["pos"]).max()
                                        / np.abs(cpu_acts["pos"]).max())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.gpucheck", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a checkpoint folder")
    src.add_argument("--random-init", type=Path, help="a folder with config.json and tokenizer files")
    ap.add_argument("--out", type=Path, default=Path("runs/gpucheck"))
    ap.add_argument("--only", default="loop,probes,bench", help="comma-separated subset of loop,probes,bench")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("benchmarks.gpucheck: no CUDA device visible", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(random_model(args.random_init, args.out / "random-model"))
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": model}
    steps = {"loop": lambda: loop(model, args.out), "probes": lambda: probes(model), "bench": lambda: bench(model)}
    failed = False
    for name in args.only.split(","):
        t = time.time()
        try:
            res[name] = {"ok": True, **steps[name]()}
        except Exception as e:  # report every step, then fail
            traceback.print_exc()
            res[name], failed = {"ok": False, "error": repr(e)[:500]}, True
        res[name]["seconds"] = round(time.time() - t, 1)
        print(f"{name}: {json.dumps(res[name])}", flush=True)
        (args.out / "gpucheck.json").write_text(json.dumps(res, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
