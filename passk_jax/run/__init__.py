"""The run layer: a training run's configuration (``spec``), its loop (``trainer``), data stream, held-out
evaluation, verifier monitor, SFT warm start, checkpoints, workdir, metric logs and report.

It is built on the library (``passk_jax.advantages``, ``metrics``, ``models``, ``rl``, ``sampling``,
``tasks``, ``parallel``, ...), which imports nothing from here (``tests/test_layers.py``)."""
