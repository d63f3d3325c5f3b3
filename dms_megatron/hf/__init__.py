"""Loading exported DMS checkpoints with plain transformers (``trust_remote_code``).

``modeling_dms.py`` (torch + transformers only, never dms_megatron) is the remote code: DMS attention,
the compressed ``DMSCache`` and ``DMSLlamaForCausalLM`` / ``DMSQwen2ForCausalLM`` / ``DMSQwen3ForCausalLM``.
It imports the rules it shares with the rest of the package from ``dms_rules.py``, a verbatim copy of
``dms_megatron/core/dms_rules.py`` (self-contained for that reason). ``install_remote_code(folder)``
copies both into an exported folder and points ``config.json``'s ``auto_map`` at the family class;
``launch/convert.py export`` does this for every DMS export. For folders exported before that (or to
refresh their remote code): ``python -m dms_megatron.hf FOLDER [FOLDER ...]``.

This package imports nothing heavy (no torch): the converter uses it to install the files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MODELING_FILE = Path(__file__).with_name("modeling_dms.py")
RULES_FILE = Path(__file__).parents[1] / "core" / "dms_rules.py"  # copied as REMOTE_FILES["dms_rules.py"]
REMOTE_FILES = {"modeling_dms.py": MODELING_FILE, "dms_rules.py": RULES_FILE}  # name in the folder: source
FAMILY_CLASSES = {
    "llama": "DMSLlamaForCausalLM",
    "qwen2": "DMSQwen2ForCausalLM",
    "qwen3": "DMSQwen3ForCausalLM",
}


def auto_map_entry(config: dict) -> dict[str, str]:
    """The ``auto_map`` entries for a DMS ``config.json`` dict (ValueError when it cannot use the code)."""
    if not config.get("dms"):
        raise ValueError("config.json has no dms block: not a DMS checkpoint")
    model_type = config.get("model_type")
    if model_type not in FAMILY_CLASSES:
        raise ValueError(
            f"model_type {model_type!r} has no DMS remote code; supported: {sorted(FAMILY_CLASSES)}"
        )
    return {"AutoModelForCausalLM": f"modeling_dms.{FAMILY_CLASSES[model_type]}"}


def install_remote_code(folder: str | Path) -> Path:
    """Copy the remote code (``REMOTE_FILES``) into an exported DMS folder and add ``auto_map`` to its
    ``config.json`` (``model_type`` unchanged, so AutoConfig still loads the family config). Idempotent."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    config = json.loads(cfg_path.read_text())
    entry = auto_map_entry(config)
    for name, source in REMOTE_FILES.items():
        shutil.copyfile(source, folder / name)
    config["auto_map"] = {**(config.get("auto_map") or {}), **entry}
    tmp = cfg_path.with_name(".config.json.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, cfg_path)
    return folder


__all__ = [
    "FAMILY_CLASSES",
    "MODELING_FILE",
    "REMOTE_FILES",
    "RULES_FILE",
    "auto_map_entry",
    "install_remote_code",
]
