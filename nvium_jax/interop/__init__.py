"""Interop with other ecosystems: Hugging Face Llama checkpoints (`nvium convert`)."""
