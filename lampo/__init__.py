"""LamPO: the algorithm library (advantage estimators, policy losses, rewards, the rollout record).

Functions over tensors, each kind in one registry, no backend code. Three parts are not pure: ``lampo.files``
writes files atomically (the one helper every package uses), ``lampo.record`` reads and writes rollout files (JSON
Lines), and the math reward checks answers in one worker process per Python process, started on first use and
restarted after a timeout (``lampo.rewards.math_answer``)."""
