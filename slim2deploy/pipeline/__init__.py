"""Layer 6: the pipeline stages as files-in, files-out functions: train, prune, finetune, export, build."""
