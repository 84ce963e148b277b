"""Fused and memory-lean ops for the native engine, each with a plain-PyTorch reference in tests/."""
