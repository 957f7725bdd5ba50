"""Training: gated data -> a LoRA / QLoRA adapter, refusing the mistakes that waste a run.

Public API::

    from loraforge.train import train
    result = train(config)          # RUN_DIR/adapter, manifest.json, metrics.jsonl, loss.png
"""
