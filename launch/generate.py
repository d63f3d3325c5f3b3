"""Shim for source checkouts and torchrun: ``python launch/generate.py`` = ``dms-generate``."""

from dms_megatron.cli.generate import main

if __name__ == "__main__":
    main()
