"""bnexp's batched launcher: `hydra/launcher=batched` trains a sweep's compatible runs as one
vectorized model per group (bnexp/run/loop.py), each still a run of its own."""
