"""Run ``lorabench`` in this process and send it a signal while its training step N runs (from the progress
bar's update, as tests/test_resume.py does in-process): ``python tests/interrupt_at.py SIGKILL 10 run ...``.
SIGKILL ends the process on the spot, as a crash or an OOM kill would."""
import os
import signal
import sys

import lorabench.progress as progress
import lorabench.train as train
from lorabench.cli import main

signum, at = getattr(signal, sys.argv[1]), int(sys.argv[2])
real = progress.progress


def counted(total, enabled, **kw):
    bar = real(total, enabled, **kw)
    update, seen = bar.update, [0]

    def update_and_signal(k=1):
        update(k)
        seen[0] += k
        if seen[0] == at:
            os.kill(os.getpid(), signum)

    bar.update = update_and_signal
    return bar


train._progress = counted
sys.exit(main(sys.argv[3:]))
