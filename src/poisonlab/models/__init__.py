"""Models: the Llama-layout decoder poisonlab trains (llama.py, one readable file), its checkpoints,
and its exchange formats (export to an HF directory, import of a GGUF file).

May import: rundir (a checkpoint's manifest) and the base modules. Training, evaluation and
fine-tuning all build on it; it knows none of them.
"""
