"""Peer libraries, one adapter module each, run on the benchmarks' models and data.

Every adapter returns scores in datatrace's convention: shape (n_test, n_train), positive =
proponent, and the same scale (each module's docstring lists its conversions, read in the
installed sources; the ``scale`` columns check them). Peers are imported inside the
functions, so a benchmark runs without the peers it is not asked to run.

* :mod:`peers.captum_peer`: captum 0.9.0 ``TracInCP``, ``TracInCPFastRandProj``.
* :mod:`peers.dattri_peer`: dattri 0.3.0 TracIn, every ``IFAttributor*``, TRAK.
* :mod:`peers.kronfluence_peer`: kronfluence 1.0.1 EK-FAC.
* :mod:`peers.traker_peer`: traker 0.3.2 ``TRAKer`` (scores; featurization only).
"""
