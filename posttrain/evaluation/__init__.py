"""Task metrics computed on held-out data after (or between) training runs."""
