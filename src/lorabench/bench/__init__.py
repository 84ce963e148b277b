"""``lorabench bench``: ``bench`` (engines x presets side by side, in rounds, and their tables) and ``floor``
(the unavoidable GEMMs + attention of a step, timed alone, as tokens/s)."""
