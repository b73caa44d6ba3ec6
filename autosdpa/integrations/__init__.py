"""Integrations with other libraries. Each lives in its own module and imports its library only when used:
``autosdpa.integrations.hf`` (Hugging Face transformers)."""
