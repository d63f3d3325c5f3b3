"""Shim for source checkouts and torchrun: ``python launch/preprocess.py`` = ``dms-preprocess``."""

from dms_megatron.cli.preprocess import main

if __name__ == "__main__":
    main()
