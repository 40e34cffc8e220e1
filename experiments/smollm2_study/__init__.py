"""Pass@1 vs Pass@k training on a real pretrained model (SmolLM2-135M-Instruct), pre-registered in
``DESIGN.md``; ``python -m experiments.smollm2_study --run`` trains what has no record yet (resumable),
``--report`` writes ``RESULTS.md`` from the committed records."""
