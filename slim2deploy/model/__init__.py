"""Layer 1: models and their data.

Zoo, datasets, MAC/param counts, the sparsity penalty, the training loop, the checkpoint format.
"""
