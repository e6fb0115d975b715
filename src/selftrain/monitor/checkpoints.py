"""`selftrain-drift`: the monitor on any checkpoints, outside a run.

The reference plays generation 0 (its folder `reference/` holds the frozen directions and the
embedding bandwidth); each candidate (`candidate-NN/`) is probed against it with its own seed,
and one drift report compares them all.
"""
from __future__ import annotations

import gc
from pathlib import Path

from selftrain import UserError, models
from selftrain.analysis.drift_report import build_report, write_report
from selftrain.config.schema import monitor_settings
from selftrain.monitor.probe import check_power, probe_model
from selftrain.monitor.suites import load_suite
from selftrain.run import seeds
from selftrain.run.records import write_json


def monitor_checkpoints(cfg, out: Path) -> dict:
    """`selftrain-drift`: probe a reference and candidate checkpoints, write one report into `out`.

    The reference plays generation 0 (directions and bandwidth are fixed on it); each candidate is
    sampled with its own seed.
    """
    if not cfg.candidates:
        raise UserError("candidates is empty: give at least one checkpoint, e.g. candidates=[runs/x/gen-001/model]")
    full = load_suite(cfg.probes.suite)
    suite = full.select(cfg.probes.dimensions, cfg.probes.max_items_per_dimension)
    check_power(suite, cfg.monitor, full)
    paths = [models.resolve(cfg.reference)] + [models.resolve(c) for c in cfg.candidates]
    labels = [str(cfg.reference)] + [str(c) for c in cfg.candidates]
    folders = [Path(out) / "reference"] + [Path(out) / f"candidate-{i:02d}" for i in range(1, len(paths))]
    for i, (path, folder) in enumerate(zip(paths, folders)):
        tok = models.load_tokenizer(path, cfg.model.trust_remote_code)
        model = models.load_model(path, cfg.model.dtype, cfg.model.trust_remote_code, cfg.model.allow_pickle,
                                  cfg.model.device)
        write_json(folder / "checkpoint.json", {"label": labels[i], "path": path})
        probe_model(model, tok, suite, cfg.probes, cfg.monitor, folder, reference=None if i == 0 else folders[0],
                    seed=seeds.checkpoint(cfg.seed, i), batch_size=cfg.batch_size)
        del model
        gc.collect()
    report = build_report(list(zip(labels, folders)), monitor_settings(cfg.monitor), alert_on=labels[1:],
                          title="Drift report: checkpoints against a reference", steps=False)
    write_report(report, Path(out))
    return report
