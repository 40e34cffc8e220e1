"""Reproduction of the paper's findings at small scale: exact analyses (``analyses``), a training study
(``study``) and the RESULTS.md report (``report``). Entry point: ``python -m experiments.reproduce``."""
