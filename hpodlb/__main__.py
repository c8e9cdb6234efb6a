"""`python -m hpodlb` is the `hpodlb` command."""

import sys

from hpodlb.cli import main

sys.exit(main())
