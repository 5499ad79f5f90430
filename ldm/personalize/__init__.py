"""Personalization: textual-inversion embeddings (:mod:`.embeddings`) and LoRA (:mod:`.lora`)."""
