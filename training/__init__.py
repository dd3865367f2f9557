"""Fine-tuning: GRPO with attention-based credit assignment, and AtManRL (imports faithlens)."""
