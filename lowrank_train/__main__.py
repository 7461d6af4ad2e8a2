"""``python -m lowrank_train``: the ``lowrank-train`` command, e.g. under
``torchrun --standalone --nproc_per_node N -m lowrank_train pretrain recipe.yaml``."""

import sys

from lowrank_train.cli import main

sys.exit(main())
