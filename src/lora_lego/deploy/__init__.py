"""Deployment: folding an adapter into a base checkpoint (`apply`, `checkpoint`) and what each server loads
(`targets`)."""
