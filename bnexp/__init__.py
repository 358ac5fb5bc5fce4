"""bnexp: batch-norm experiments on MNIST."""
