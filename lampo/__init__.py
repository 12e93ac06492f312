"""LamPO: the algorithm library (advantage estimators, policy losses, rewards, the rollout record).

Pure functions over tensors, each kind in one registry; no I/O, no global state, no backend code."""
