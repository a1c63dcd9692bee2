"""mlxserve: an Ollama-class local LLM server on MLX."""

__version__ = "0.1.0"
