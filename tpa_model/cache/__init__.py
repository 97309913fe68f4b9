"""The KV cache: per-layer specs, paged storage (plain or TPA factors), the step's metadata, capacity, and the
attention backends that write into it and read from it."""
