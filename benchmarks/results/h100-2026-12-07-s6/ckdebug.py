"""lorabench's CLI with torch's checkpoint debug on (the CheckpointError then lists the ops of forward and
recomputation)."""
import sys

import torch.utils.checkpoint as ckpt

from lorabench.cli import main

with ckpt.set_checkpoint_debug_enabled(True):
    rc = main(sys.argv[1:])
sys.exit(rc)
