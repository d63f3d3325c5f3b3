"""Shim for source checkouts and torchrun: ``python launch/evaluate.py`` = ``dms-evaluate``."""

from dms_megatron.cli.evaluate import main

if __name__ == "__main__":
    main()
