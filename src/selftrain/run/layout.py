"""Where everything lives in a run folder: the one module that spells its file and folder names.

    <run>/manifest.json                  resolved config, hashes, seeds, versions, attempts
    <run>/index.html                     the run dashboard
    <run>/replaced-<time>/               outputs moved aside by force_stage or resume=false
    <run>/gen-NNN/                       generation k (GenDir), NNN = k, three digits or more:
        manifest.json                    parent model, model path, stage status / timing / counts
        probes/                          probe stage: per-item probe scores
        monitor/                         probe stage: instruments (directions, embeddings, samples...)
        drift/report.{json,md}           report stage
        samples.jsonl                    sample stage: model k's answers
        critiques.jsonl                  critique stage: every critique/revision round
        data/{sft,preference}            data stage (label stage: data/preference)
        preferences.jsonl                label stage: every labelled pair
        screen/{screen.json,rows.jsonl,data/}   screen stage (data/: the filtered copy, screen=drop)
        train/                           train stage's work folder (train_log.json)
        model/                           generation k's weights (k >= 1), written by gen-(k-1)'s train
        .chunks/{sample,critique}/NNNNN.jsonl   committed chunks of an unfinished stage

Analysis code reads run folders through this module too: it imports nothing heavy.
"""
from __future__ import annotations

import re
from pathlib import Path

MANIFEST = "manifest.json"
DASHBOARD = "index.html"
REPLACED_PREFIX = "replaced-"
GEN_PREFIX = "gen-"
# A generation's stages in the order they run (the keys of its manifest's `stages`); the last
# generation runs only the monitor's two.
STAGES = ("probe", "report", "sample", "critique", "data", "label", "screen", "guard", "train")
MONITOR_ONLY = ("probe", "report")
GEN_GLOB = "gen-[0-9][0-9][0-9]"  # what gen_dirs() lists: three digits (generations under 1000)
_GEN_NAME = re.compile(r"^gen-(\d{3,})$")


def gen_name(k: int) -> str:
    """Generation k's folder name: gen-000, gen-001, ..."""
    return f"{GEN_PREFIX}{k:03d}"


def gen_index(name: str) -> int | None:
    """k from a generation folder's name (gen-007 -> 7); None for any other name."""
    m = _GEN_NAME.match(name)
    return int(m.group(1)) if m else None


def is_gen_name(name: str) -> bool:
    """Whether `name` is spelled like a generation folder (gen-…): the test analysis uses to tell
    a generation's manifest from a run's."""
    return name.startswith(GEN_PREFIX)


def gen_dir(run_dir: Path, k: int) -> Path:
    """Generation k's folder in `run_dir`."""
    return Path(run_dir) / gen_name(k)


def gen_dirs(run_dir: Path) -> list[Path]:
    """The generation folders of `run_dir` that exist, in order of k."""
    return sorted(g for g in Path(run_dir).glob(GEN_GLOB) if g.is_dir())


class GenDir:
    """Generation k's folder and the path of every artifact in it."""

    def __init__(self, run_dir: Path, k: int):
        self.run_dir, self.k = Path(run_dir), k
        self.path = gen_dir(run_dir, k)
        self.name = self.path.name

    @classmethod
    def at(cls, path: Path) -> "GenDir":
        """The layout of an existing folder laid out like a generation: a run's gen-NNN (k read
        from its name), or a folder of another tool's (selftrain-drift's checkpoints, k None)."""
        g = cls.__new__(cls)
        g.path = Path(path)
        g.run_dir, g.k, g.name = g.path.parent, gen_index(g.path.name), g.path.name
        return g

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"GenDir({str(self.path)!r})"

    def rel(self, path: Path) -> str:
        """`path` relative to the run folder, as manifests name outputs."""
        return Path(path).relative_to(self.run_dir).as_posix()

    # generation files
    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST

    @property
    def probes(self) -> Path:
        return self.path / "probes"

    @property
    def monitor(self) -> Path:
        return self.path / "monitor"

    @property
    def directions(self) -> Path:
        return self.monitor / "directions"

    @property
    def drift(self) -> Path:
        return self.path / "drift"

    @property
    def report_json(self) -> Path:
        return self.drift / "report.json"

    @property
    def report_md(self) -> Path:
        return self.drift / "report.md"

    @property
    def samples(self) -> Path:
        return self.path / "samples.jsonl"

    @property
    def critiques(self) -> Path:
        return self.path / "critiques.jsonl"

    @property
    def preferences(self) -> Path:
        return self.path / "preferences.jsonl"

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def sft(self) -> Path:
        return self.data / "sft"

    @property
    def preference(self) -> Path:
        return self.data / "preference"

    @property
    def screen(self) -> Path:
        return self.path / "screen"

    @property
    def screen_json(self) -> Path:
        return self.screen / "screen.json"

    @property
    def screen_rows(self) -> Path:
        return self.screen / "rows.jsonl"

    @property
    def screen_data(self) -> Path:
        """The screen's filtered copy of data/ (monitor.screen=drop)."""
        return self.screen / "data"

    def train_data(self, screen_mode: str) -> Path:
        """Where training reads generation k's data: the screen's filtered copy under screen=drop."""
        return self.screen_data if screen_mode == "drop" else self.data

    @property
    def train(self) -> Path:
        return self.path / "train"

    @property
    def train_log(self) -> Path:
        return self.train / "train_log.json"

    @property
    def model(self) -> Path:
        """Generation k's own weights (k >= 1; gen-000's model is the base model, elsewhere)."""
        return self.path / "model"

    @property
    def chunks(self) -> Path:
        return self.path / ".chunks"

    def chunk_dir(self, stage: str) -> Path:
        """Where a chunked stage (sample, critique) commits its chunks."""
        return self.chunks / stage

    # neighbours
    def parent(self) -> "GenDir":
        return GenDir(self.run_dir, self.k - 1)

    @property
    def first(self) -> "GenDir":
        """gen-000 of the same run: the reference the monitor compares against."""
        return GenDir(self.run_dir, 0)

    def child(self) -> "GenDir":
        return GenDir(self.run_dir, self.k + 1)

    @property
    def child_model(self) -> Path:
        """gen-(k+1)/model: the weights generation k's train stage writes (the one output a stage
        writes outside its own generation's folder)."""
        return self.child().model


class RunDir:
    """A run folder: its manifest, dashboard and generations."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST

    @property
    def dashboard(self) -> Path:
        return self.path / DASHBOARD

    def replaced(self, stamp: str) -> Path:
        """Where force_stage / resume=false move earlier outputs."""
        return self.path / f"{REPLACED_PREFIX}{stamp}"

    def gen(self, k: int) -> GenDir:
        return GenDir(self.path, k)

    def gens(self) -> list[GenDir]:
        """The generation folders that exist, in order of k."""
        return [GenDir(self.path, gen_index(g.name)) for g in gen_dirs(self.path)]
