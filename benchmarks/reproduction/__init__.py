"""The LIME reproduction (`benchmarks/reproduce.py`): one module per experiment over a shared harness.

harness.py          settings (presets), files, models, optimiser, resumable checkpoints
prepare.py          stage `prepare`: corpus annotation, BPE, alignment, prefix-only tags, addition data
language_models.py  experiment: data efficiency and the leak (baseline / LIME / LIME+1 on Austen)
addition.py         experiment: guided arithmetic (LIME+1 on synthetic addition)
self_tagging.py     experiment: tag heads (self-tagged, honest evaluation), plain-BPE baseline, tag noise
free_generation.py  stage `generate`: free generation scored by a judge model
runs.py             stage `train`: every run, in-process or as `--jobs N` subprocesses
report.py           stage `report` and the README table
"""
