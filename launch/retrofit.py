"""Shim for source checkouts and torchrun: ``python launch/retrofit.py`` = ``dms-retrofit``."""

from dms_megatron.cli.retrofit import main

if __name__ == "__main__":
    main()
