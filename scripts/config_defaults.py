"""Write the Hydra group files that hold the config dataclasses' defaults (``configs/dms/default.yaml``,
``train/default.yaml``, ``parallel/single.yaml``, ``data/none.yaml``, ``logging/default.yaml``) from
``dms_megatron.config``: the dataclasses are the single source of defaults.

    python scripts/config_defaults.py           # rewrite the files
    python scripts/config_defaults.py --check   # exit 1 if any differs (tests/unit/test_run_config.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from dms_megatron.config import GROUP_DEFAULT_FILES, defaults_yaml  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    args = ap.parse_args(argv)
    stale = []
    for name, cls in GROUP_DEFAULT_FILES.items():
        path = ROOT / "configs" / name
        text = defaults_yaml(cls)
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(text)
            print(f"wrote configs/{name}")
    if args.check and stale:
        print(f"out of date with dms_megatron/config.py: {stale}; run python scripts/config_defaults.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
