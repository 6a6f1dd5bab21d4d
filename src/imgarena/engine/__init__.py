"""Training engine: `train.run_training` (the whole run), `loop.train_one_epoch`, `evaluate.evaluate`,
optimizers and schedules (`optim`), EMA, resumable state, torchrun/DDP helpers and console output.

Imports torch; nothing here is imported by `import imgarena`.
"""
