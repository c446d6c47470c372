"""Expert identity: a fingerprint over what decides an expert's outputs.

The fingerprint is a sha256 over the model file's sha256, the LoRA adapter's sha256
and scale, and the domain prompt's sha256, as an agent's `info` reply reports them.
The expert's name, address and hardware are not part of it, so score caches and gates
keep following an expert that is renamed or moved to another box.

This module imports only the standard library, so the generation path can use it.
"""

from __future__ import annotations

import hashlib
import json


class IdentityError(ValueError):
    """An `info` reply lacks the fields that identify the expert."""


def expert_fingerprint(info: dict) -> str:
    """Return a sha256 over what decides an expert's outputs: model file, LoRA, domain prompt."""
    lora = info.get("lora") or {}
    domain = info.get("domain_prompt") or {}
    identity = {"model_sha256": info.get("model_sha256"), "lora_sha256": lora.get("sha256"),
                "lora_scale": lora.get("scale"), "domain_prompt_sha256": domain.get("sha256")}
    if not identity["model_sha256"]:
        raise IdentityError(f"agent info has no model_sha256; cannot identify expert {info.get('name')!r}")
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()
