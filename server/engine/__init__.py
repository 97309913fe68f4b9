"""The inference engine: scheduling, block bookkeeping, the model runner, sampling, detokenization."""
