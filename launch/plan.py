"""Shim for source checkouts and torchrun: ``python launch/plan.py`` = ``dms-plan``."""

import sys

from dms_megatron.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
