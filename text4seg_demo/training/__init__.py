"""The bundled tiny models: their synthetic domain, architecture and tokenizer, training stages and cards."""
