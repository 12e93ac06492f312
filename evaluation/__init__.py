"""Benchmark evaluation: loaders, prompts, grading (through lampo.rewards), metrics and reports.

Entry points: :func:`evaluation.run.evaluate` (the pipeline's evaluate stage and the command line),
``python -m evaluation`` (any checkpoint), :data:`evaluation.benchmarks.BENCHMARKS` (the definitions) and
:func:`evaluation.report.log_to_tensorboard`.

The package imports :mod:`lampo` and nothing of the pipeline (tests/test_layering.py): it owns the rollout-engine
interface it drives (:mod:`evaluation.engine`) and the tiny task its ``tiny`` benchmarks hold out
(:mod:`evaluation.tiny_task`), which the pipeline implements and re-exports. Only the command line
(``evaluation/__main__.py``, an entry point) builds the pipeline's engines from a pipeline config.
"""
