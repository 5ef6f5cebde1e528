"""Evaluation stage: the evaluator run during training and on saved runs (the trigger, the control
and the look-alike panel; the perplexity gap and attack success), batched generation, and the
calibration of the success rule on a clean model.

May import: models, corpus, rundir and the base modules. Not training: the trainer hands the
evaluator a model.
"""
