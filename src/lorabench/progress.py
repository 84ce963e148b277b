"""Progress of long work: a tqdm bar on a terminal; off a terminal (a log file, CI) one whole line every tenth of
the work and at its end instead of carriage returns; nothing when not enabled. Training, MMLU and ROUGE use it."""
from __future__ import annotations

import sys


def progress(total: int, enabled: bool, desc: str = "train", unit: str = "step", stream=None):
    """A bar with tqdm's ``update``, ``set_postfix``, ``close`` and context manager."""
    stream = sys.stderr if stream is None else stream
    if enabled and not stream.isatty():
        return PlainProgress(total, stream, desc, unit)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, file=stream)


class PlainProgress:
    """The calls made of a tqdm bar, written as whole lines: ``train: step 5/42 (epoch 1, loss 2.31)``, one each
    time the count passes a tenth of the total (``set_postfix`` before ``update`` puts its values in that line)."""

    def __init__(self, total: int, stream, desc: str = "train", unit: str = "step"):
        self.total, self.stream, self.desc, self.unit = total, stream, desc, unit
        self.n, self.every, self.postfix = 0, max(1, total // 10), {}

    def update(self, k: int = 1):
        before, self.n = self.n, self.n + k
        if k and (self.n // self.every > before // self.every or self.n >= self.total > before):
            extra = ", ".join(f"{key} {v}" for key, v in self.postfix.items())
            print(f"{self.desc}: {self.unit} {self.n}/{self.total}" + (f" ({extra})" if extra else ""),
                  file=self.stream, flush=True)

    def set_postfix(self, **kw):
        self.postfix = kw

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
