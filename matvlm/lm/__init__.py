"""Text-only language models: GGUF import, self-generated distillation data, `eval-lm`.

The MambaInLlama use case: a text LLM (Llama / Qwen2 / Phi family, GQA included) converted and
distilled with the same code as the VLMs; these modules add what only text models need.
"""
