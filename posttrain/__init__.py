"""posttrain: plain-PyTorch post-training for open-weight LLMs."""
