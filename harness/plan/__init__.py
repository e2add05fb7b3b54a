"""Planning in the parent, before any worker: the matrix, models, memory plans, pre-flight and shards."""
