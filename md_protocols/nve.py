#!/usr/bin/env python
"""NVE molecular dynamics with a gaq_calc model: the same program as the `gaq-nve` console script
(gaq_calc/cli/nve.py), same options; `python md_protocols/nve.py --help` lists them."""

import sys

from gaq_calc.cli.nve import main

if __name__ == "__main__":
    sys.exit(main())
