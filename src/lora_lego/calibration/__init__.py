"""Calibration and evidence: a base model's forward passes on a few unlabeled prompts (input Grams, retention
scores, self-generated prompts) and the merges that need them (regmean_pp, auto). The only package that imports
transformers; the `Calibration` data object (`grams`) needs none of it."""
