"""Decompiling transformers into RASP-like Python: prune causally, match parts to primitives, emit code."""
