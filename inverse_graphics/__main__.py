"""`python -m inverse_graphics ...` is `inverse-graphics ...`; torchrun needs it: `torchrun --nproc-per-node N -m
inverse_graphics train <model> ...` (see README, "Training on several processes or machines")."""

import sys

from inverse_graphics.cli import main

sys.exit(main())
