"""Zoo entries of decompilation: small transformers trained here on algorithmic tasks."""
