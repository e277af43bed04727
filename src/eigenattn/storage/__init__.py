"""Shared: where the pipeline's bytes live. Zarr stores (the one writer and the one opener),
tables, the background score writer, checked shard reads, the size of a score store and the free
disk, fetched assets and job logs.
"""
