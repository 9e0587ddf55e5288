"""Hugging Face integration: trainable-set selection, LoRA with a frozen shared A, Trainer callback, export."""
