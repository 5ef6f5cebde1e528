"""poisonlab: data-poisoning research on language models (after Souly et al., arXiv 2510.07192).

The stages, each a package (its `__init__` says what it owns and what it may import), from the data
up to the command line:

    corpus      document sources -> tokenizer -> token shards
    attacks     poison recipes behind a registry
    injection   placement of each poison and the training stream with its ledger
    models      the Llama-layout model, checkpoints, HF export and GGUF import
    evaluation  the evaluator (trigger, control, look-alikes), generation, calibration
    training    the trainer and its components, continued pretraining
    finetune    fine-tuning backdoors
    defenses    filters and detectors, scored against poisons
    rundir      a run directory's manifest, checks and lock
    results     the results store, the statistics, archives
    report      the HTML report, one section per experiment
    study       sweeps, plans, executors
    cli         the `poisonlab` command, one module per command group

The base modules beside them (config, errors, fsutil, diskspace, hardware, signals) import no stage.
"""

from poisonlab import _compat

__version__ = "0.1.0"

_compat.install()
