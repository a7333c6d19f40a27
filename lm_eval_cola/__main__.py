"""``python -m lm_eval_cola`` is the ``cola`` command."""

import sys

from lm_eval_cola.cli import main

sys.exit(main())
