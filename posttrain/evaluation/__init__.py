"""Task metrics on held-out data: during training (validation.py: eval_loss; generation.py: eval_accuracy,
both as trainer step hooks) and after it (next_event.py)."""
