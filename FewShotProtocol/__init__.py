"""The papers' few-shot protocol on CHAOS-T2 (research code, not shipped with the engine).

Folds, supports, scoring and the test-time options the protocol rows compare
(`benchmarks/fewshot_protocol.py` runs it). The engine, `FewShotSegLib`, never imports
this package; this package imports the engine.
"""
