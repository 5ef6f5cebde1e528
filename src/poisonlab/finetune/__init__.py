"""Fine-tuning backdoors: instruction data with poisoned examples, the LoRA/full fine-tuning loop,
its judge and evaluation, and the statistics of its sweeps (a sweep of them is study/finetune_sweep).

May import: models, corpus, rundir and the base modules.
"""
