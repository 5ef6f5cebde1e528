"""The results store: reading finished runs into one table (store.py), experiment groups and their
summary (summary.py), the clean capability against the N = 0 control (clean.py), the printed table
(table.py), the count-vs-fraction statistics (count_fraction.py) and archives of runs for findings
(archive.py).

May import: injection (placement columns), corpus (data headers), rundir and the base modules.
"""

from poisonlab.results.store import connect, gather
from poisonlab.results.summary import summary

__all__ = ["connect", "gather", "summary"]
