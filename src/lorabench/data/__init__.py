"""Data: tokenizers (tokenizer.py), samsum loading (samsum.py), prompt formatting and packing (packing.py)."""

import re
from pathlib import Path

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_name(source) -> bool:
    """'owner/name' that is not a local path: the only form read from a hub (with the 'datasets' package)."""
    return not Path(source).exists() and bool(_HUB_NAME.match(str(source)))
