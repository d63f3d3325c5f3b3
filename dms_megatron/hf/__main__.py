"""``python -m dms_megatron.hf FOLDER [FOLDER ...]``: make exported DMS folders loadable with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``."""

from __future__ import annotations

import sys

from dms_megatron.hf import install_remote_code


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    for folder in argv:
        install_remote_code(folder)
        print(f"installed modeling_dms.py into {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
