"""``python -m latentdit`` (and ``accelerate launch -m latentdit train ...``)."""

import sys

from .cli import main

sys.exit(main())
