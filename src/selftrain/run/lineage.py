"""Lineage: print a run's chain of generations and verify every recorded hash on disk.

A run's claims are only as good as the chain behind them: which data, from which model,
under which constitution and probe suite, with which config. Every manifest records hashes
(`records.sha256_tree`); this module recomputes them from the files on disk and reports one
line per mismatch. It reads manifests and hashes files; it never loads a model.

What is checked:
  run        the constitution file (+ its few-shot file), the probe suite, the prompt set;
             each generation's config hash equals the run's
  gen-k      the model folder's hash (`model_sha256`); `parent_model_sha256` equals gen-(k-1)'s
             model hash; every stage's `outputs` {path relative to the run folder: sha256}
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from selftrain import UserError
from selftrain.run.layout import MANIFEST, GenDir, gen_name
from selftrain.run.records import read_json, sha256_tree


@dataclass
class Lineage:
    run_dir: Path
    lines: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    checked: int = 0

    def check(self, what: str, recorded: str | None, actual: str | None, indent: str = "  ") -> str:
        """Compare one recorded hash with the disk; return 'ok' or record a mismatch line."""
        self.checked += 1
        if actual is None:
            self.mismatches.append(f"MISSING {what}: recorded {_short(recorded)}, not on disk")
            return "MISSING"
        if recorded != actual:
            self.mismatches.append(f"MISMATCH {what}: recorded {_short(recorded)}, on disk {_short(actual)}")
            return "MISMATCH"
        return "ok"

    def to_dict(self) -> dict:
        return {"run": str(self.run_dir), "checked": self.checked, "mismatches": self.mismatches,
                "lines": self.lines}


def _short(h: str | None) -> str:
    return "none" if not h else h[:12]


def config_sha256(config: dict) -> str:
    """Hash of a resolved config: canonical JSON (sorted keys), so key order never matters."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _hash_or_none(path: Path) -> str | None:
    return sha256_tree(path) if path.exists() else None


def _read_manifest(path: Path) -> dict:
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON manifest ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a selftrain manifest (expected a JSON object)")
    return data


def trace(run_dir: Path) -> Lineage:
    """Walk the run's manifests and verify every hash they record."""
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file():
        raise UserError(f"{run_dir}: not a selftrain run folder (no {MANIFEST})")
    man = _read_manifest(run_dir / MANIFEST)
    if "config" not in man:
        raise UserError(f"{run_dir / MANIFEST}: not a selftrain run manifest (no 'config')")
    lin = Lineage(run_dir)
    config = man["config"]
    cfg_hash = config_sha256(config)
    lin.lines.append(f"run {run_dir}  status {man.get('status', '?')}  config {cfg_hash[:12]}")
    _check_inputs(lin, man)

    k = 0
    prev_model_hash: str | None = None
    while GenDir(run_dir, k).manifest.is_file():
        gen = GenDir(run_dir, k)
        name, parent = gen.name, gen_name(k - 1)
        g = _read_manifest(gen.manifest)
        model = g.get("model", "?")
        # generation k >= 1 lives in the run folder (which may have been moved or copied since)
        model_path = gen.model if k > 0 else Path(model)
        recorded = g.get("model_sha256")
        if recorded is None:
            state = "not hashed (hub id)" if not model_path.exists() else "not hashed"
        else:
            state = lin.check(f"{name} model {model}", recorded, _hash_or_none(model_path))
        line = f"{name}  model {_rel(model_path, run_dir)}  sha256 {_short(recorded)}  {state}"
        if k > 0:
            parent_hash = g.get("parent_model_sha256")
            if parent_hash is not None:
                st = lin.check(f"{name} parent model hash vs {parent} model_sha256", prev_model_hash,
                               parent_hash) if prev_model_hash is not None else "unchecked"
                line += f"  parent {parent} {_short(parent_hash)} {st}"
            else:
                line += f"  parent {parent}"
        if g.get("config_sha256") is not None:
            line += "  config " + lin.check(f"{name} config hash vs the run's", cfg_hash, g["config_sha256"])
        for key, label in (("constitution", "constitution"), ("probe_suite", "probe suite")):
            if g.get(f"{key}_sha256") is not None and (man.get(key) or {}).get("sha256"):
                line += f"  {label} " + lin.check(f"{name} {label} hash vs the run's", man[key]["sha256"],
                                                  g[f"{key}_sha256"])
        if g.get("data_sha256") and g.get("data"):
            line += f"  trained on {g['data']} {_short(g['data_sha256'])}"
        lin.lines.append(line)
        for stage, entry in g.get("stages", {}).items():
            outputs = entry.get("outputs") or {}
            status = entry.get("status", "?")
            if not outputs:
                lin.lines.append(f"  {stage:<9} {status}")
                continue
            for rel, h in outputs.items():
                st = lin.check(f"{rel} (stage {stage} of {name})", h, _hash_or_none(run_dir / rel))
                lin.lines.append(f"  {stage:<9} {status}  {rel}  sha256 {_short(h)}  {st}")
        prev_model_hash = recorded
        k += 1
    if k == 0:
        lin.lines.append("(no generations yet)")
    lin.lines.append(f"lineage: {lin.checked} hashes checked, {len(lin.mismatches)} mismatch(es)")
    return lin


def _rel(path: Path, run_dir: Path) -> str:
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except (ValueError, OSError):
        return str(path)


def _check_inputs(lin: Lineage, man: dict) -> None:
    """The constitution, probe suite and prompt set as they are now, against the recorded hashes."""
    from omegaconf import OmegaConf

    from selftrain.constitution import Constitution
    from selftrain.monitor.suites import load_suite
    from selftrain.prompts import load_prompts, prompts_hash

    cfg = OmegaConf.create(man["config"])
    con = man.get("constitution") or {}
    if con.get("sha256"):
        try:
            actual = Constitution.load(con["path"]).sha256
        except UserError:
            actual = None
        st = lin.check(f"constitution {con.get('path')}", con["sha256"], actual)
        lin.lines.append(f"  constitution {con.get('name')} ({con.get('path')})  sha256 {_short(con['sha256'])}  {st}")
    suite = man.get("probe_suite") or {}
    if suite.get("sha256"):
        try:
            actual = load_suite(cfg.probes.suite).sha256
        except UserError:
            actual = None
        st = lin.check(f"probe suite {cfg.probes.suite}", suite["sha256"], actual)
        lin.lines.append(f"  probe suite {suite.get('name')} v{suite.get('version')}  "
                         f"sha256 {_short(suite['sha256'])}  {st}")
    prompts = man.get("prompts") or {}
    if prompts.get("sha256"):
        try:
            actual = prompts_hash(load_prompts(cfg.prompts, cfg.seed))
        except UserError:
            actual = None
        except Exception:  # a hub dataset offline: cannot be re-read here, so say so instead of failing
            actual = "unavailable"
        if actual == "unavailable":
            lin.lines.append(f"  prompts {prompts.get('count')}  sha256 {_short(prompts['sha256'])}  "
                             "not re-read (source unavailable)")
        else:
            st = lin.check("prompt set", prompts["sha256"], actual)
            lin.lines.append(f"  prompts {prompts.get('count')}  sha256 {_short(prompts['sha256'])}  {st}")
