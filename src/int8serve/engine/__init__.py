"""The engine: turns a checkpoint and token ids into tokens. Knows nothing of HTTP, accounts or JSON."""
