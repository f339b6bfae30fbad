"""``python -m flowrl.commands <command> [args]`` (and ``torchrun ... -m flowrl.commands train ...``)."""

import sys

from flowrl.commands import main

sys.exit(main())
