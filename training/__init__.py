"""training: the library behind the training and evaluation jobs (config, data feeding, model wrappers, the per-worker
loop, checkpoints, tracking, memory measurement, the Ray driver). Entry points in jobs/ parse arguments and call it."""
