"""Backends that can answer a chat: the in-process local engine, Ollama, OpenAI-compatible APIs."""
