#!/usr/bin/env python
"""NVT molecular dynamics with a gaq_calc model: the same program as the `gaq-nvt` console script
(gaq_calc/cli/nvt.py), same options; `python md_protocols/nvt.py --help` lists them."""

import sys

from gaq_calc.cli.nvt import main

if __name__ == "__main__":
    sys.exit(main())
