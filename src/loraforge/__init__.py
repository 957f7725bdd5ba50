"""loraforge: from raw instruction data to a LoRA adapter served in production.

Stages, one subpackage each, in the order a sample travels through them:
``gate`` (clean data) -> ``train`` -> ``eval`` -> ``serve`` -> ``client`` -> ``monitor``.
Shared pieces: ``config`` (typed configuration of every stage), ``errors`` (one exception
hierarchy), ``models`` (the embedded default model, local models, tiny test models).
"""

__version__ = "0.1.0"
