"""Studies: a sweep spec expanded into runs (spec.py) and run (sweep.py), its compute plan (plan.py),
the executors that run it (inline, local processes, Slurm through submitit) and fine-tuning sweeps
(finetune_sweep.py).

May import every stage below the command line: training, finetune, evaluation, models, report,
results, injection, corpus, rundir and the base modules.
"""
