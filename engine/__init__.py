"""hexgen.engine: torch execution (models, paged KV cache, continuous batching, KV transfer)."""
