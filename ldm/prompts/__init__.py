"""Prompts: the A1111 syntax (:mod:`.parser`), long prompts as 75-token windows (:mod:`.windows`),
and the pipeline's text side with embeddings and LoRAs (:mod:`.conditioner`)."""
