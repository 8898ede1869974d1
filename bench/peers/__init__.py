"""Peer libraries, one adapter module each, run on the benchmarks' models and data.

Every adapter returns scores in datatrace's convention: (n_test, n_train), positive =
proponent, same scale (each module's docstring lists its conversions). Peers are imported
inside the functions, so a benchmark runs without the peers it is not asked to run.
"""
