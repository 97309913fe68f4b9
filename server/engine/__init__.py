"""The inference engine: scheduling, paged factor cache bookkeeping, sampling, detokenization."""
