"""Rows and shards: the corpus (row checks, the builder from a user's tokenized records, one reader
and one writer), the teacher top-k precompute on Ray Data, the shard contract (format, manifest,
reading a shard back) and the order a training worker reads rows in."""
