"""Preference tuning after (or instead of) domain adaptation: DPO on the adapter, in peftkit's own loop.

`config.py` holds the `align.*` settings, `pairs.py` reads and tokenizes preference pairs, `dpo.py` the
loss and the held-out measures, `trainer.py` the `PreferenceTrainer` and `report.py` its final evaluation.
Importing this package imports nothing heavy; trl is imported where its collator is used.
"""
