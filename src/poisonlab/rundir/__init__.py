"""What a run directory promises: the DONE manifest of its files (manifest.py), the check that a run
is whole (check.py), and the lock held by the one process training it (lock.py).

May import: the base modules only. Every stage that writes or reads runs uses it.
"""
