"""Training stage: the trainer (trainer.py, a short file wiring the components) and one component per
concern beside it: the resolved run (resolve.py), schedule (budget, lr, when to evaluate and
checkpoint), records (the run directory's files and their resume), throughput (tokens/s, MFU),
distributed (DDP/FSDP) and continued pretraining (a run that starts from trained weights).

May import: injection, attacks, corpus, models, evaluation, rundir and the base modules.
"""
