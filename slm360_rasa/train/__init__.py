"""numpy training code: optimizer, heads, fine-tuning, distillation, continual learning (no Rasa)."""
