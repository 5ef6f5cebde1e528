"""Injection stage: where each poison goes (placement) and the training stream that packs clean
documents and poisons into batches, step by step, with its ledger of which poison was trained on at
which step.

May import: attacks, corpus and the base modules (config, errors, fsutil). Nothing above it.
"""
