"""``python -m guided_diffusion <command>``: the ``anofpdm`` command (``guided_diffusion.commands``)."""

import sys

from guided_diffusion.commands import main

sys.exit(main())
