"""On-device reductions of PPO statistics. Each reducer accumulates device tensors across the
minibatches and epochs of one update and hands them over through :func:`transfer` once."""
