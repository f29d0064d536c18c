"""``python -m stablehlo_bridge``: see ``stablehlo_bridge.cli``."""

import sys

from stablehlo_bridge.cli import main

sys.exit(main())
