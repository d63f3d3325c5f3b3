"""Shim for source checkouts and torchrun: ``python launch/demo.py`` = ``dms-demo``."""

from dms_megatron.cli.demo import main

if __name__ == "__main__":
    main()
