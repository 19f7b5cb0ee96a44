"""vllm-caote: CAOTE KV-cache eviction for vLLM."""

__version__ = "0.3.0.dev0"
