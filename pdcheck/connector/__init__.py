"""The reference P2P KV connector: a vLLM plugin facade over a vLLM-free core."""
