"""Data: tokenizers (tokenizer.py), samsum loading (samsum.py), prompt formatting and packing (packing.py)."""
