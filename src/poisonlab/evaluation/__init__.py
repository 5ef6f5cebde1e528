"""Evaluation stage: the evaluator run during training and on saved runs (the trigger, the control
and the look-alike panel; the perplexity gap and attack success), batched generation, and the
calibration of the success rule on a clean model.

    panel        the look-alike controls (derived from the trigger or given) and the unseen-token check
    prompts      eval-split excerpts, prompt files, a HF model directory's tokenizer and special tokens
    metrics      the success rule and the metric columns from per-prompt perplexities
    loading      a run directory or local HF model loaded for evaluation
    generation   batched sampling with a KV cache, and scoring
    evaluator    the Evaluator: prompts x conditions, generation batches, scoring, samples
    standalone   evaluating a saved run or HF model from its path (`poisonlab eval`)
    calibration  every condition's ASR under a grid of success rules, from kept perplexities
    lmeval       the clean score of a local HF model through lm-evaluation-harness, offline (a local
                 task over the eval split's documents)

A module imports only those above it in this list.

May import: models, corpus, rundir and the base modules. Not training: the trainer hands the
evaluator a model.
"""
