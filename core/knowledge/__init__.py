"""The knowledge engine: documents → chunks → embeddings → retrieval → grounded prompts with citations."""
