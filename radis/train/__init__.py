"""Training on DeepSpeed: the recipe (setup / train / save_checkpoint / resume), the LR
schedule, crash-safe checkpoints, metrics, and the `radis train` / `radis export` commands.

    radis.train.recipe      RadisRecipe, preflight, TrainingError
    radis.train.schedule    LRFactor (warmup + cosine / linear / inverse_sqrt / constant)
    radis.train.checkpoint  save to a temporary tag, rename, move `latest`, prune
    radis.train.metrics     FLOPs / MFU, JSONL + TensorBoard writer
    radis.train.command     `radis train`
    radis.train.export      `radis export` (consolidated HF model directory)

Submodules import torch / DeepSpeed; this package itself imports nothing heavy.
"""
