"""Test stand-in package for flash-attn-4 (see cute/interface.py)."""
