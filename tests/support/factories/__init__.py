"""Seeded tiny-model and dataset generators. Outputs are cached in .work/cache, keyed by the source of
the generator, so a change to a generator regenerates its files and nothing else does."""
