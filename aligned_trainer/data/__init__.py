"""Datasets, caption processing, buckets and the on-disk text-embedding / latent caches."""
