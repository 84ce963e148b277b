"""Send a run a signal while its training step N runs (from the progress bar's update). In-process for the tests
(``signalling_progress``); as a script it runs ``lorabench`` so: ``python tests/interrupt_at.py SIGKILL 10 run ...``
(SIGKILL ends the process on the spot, as a crash or an OOM kill would)."""
import os
import signal
import sys


def signalling_progress(real, at: int, signum: int):
    """A progress-bar factory like ``real`` whose bars send ``signum`` to this process when step ``at`` ends."""
    def progress(total, enabled, **kw):
        bar = real(total, enabled, **kw)
        update, seen = bar.update, [0]

        def update_and_signal(k=1):
            update(k)
            seen[0] += k
            if seen[0] == at:
                os.kill(os.getpid(), signum)

        bar.update = update_and_signal
        return bar

    return progress


if __name__ == "__main__":
    import lorabench.train as train
    from lorabench.cli import main

    train._progress = signalling_progress(train._progress, int(sys.argv[2]), getattr(signal, sys.argv[1]))
    sys.exit(main(sys.argv[3:]))
