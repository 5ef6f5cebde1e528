"""What a run directory promises: the DONE manifest of its files (manifest.py), the check that a run
is whole (check.py), the lock held by the one process training it (lock.py), and the live curves of
its records in TensorBoard and trackio (tracking.py; pretraining and fine-tuning runs both write them),
and the JSON Lines reader for its record files and users' prompt files (jsonl.py).

May import: the base modules only. Every stage that writes or reads runs uses it.
"""
