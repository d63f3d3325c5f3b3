"""Shim for source checkouts and torchrun: ``python launch/convert.py`` = ``dms-convert``."""

from dms_megatron.cli.convert import main

if __name__ == "__main__":
    main()
