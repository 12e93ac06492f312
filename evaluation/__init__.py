"""Benchmark evaluation: loaders, prompts, grading (through lampo.rewards), metrics and reports.

Entry points: :func:`evaluation.run.evaluate` (the pipeline's evaluate stage and the command line),
``python -m evaluation`` (any checkpoint), :data:`evaluation.benchmarks.BENCHMARKS` (the definitions) and
:func:`evaluation.report.log_to_tensorboard`.
"""
