"""Curvature products over torch.distributed: each rank holds a shard of the data."""
