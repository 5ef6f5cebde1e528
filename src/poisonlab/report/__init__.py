"""The HTML report: the page (page.py) with its main results, and one section module per experiment
(density, persistence, placement, language, finetune, samples, clean), sharing figures.py and html.py.
Adding an experiment's section is one module here plus one line in page.py.

May import: results, finetune (its config and statistics), attacks, injection (ledgers) and the
base modules.
"""
