"""Benchmarks of loraforge's stages (``loraforge bench gate``): numbers measured, never assumed."""
