"""Throughput benchmarks (``pipeline bench``): model, loader, e2e, baseline and scaling modes.

``model``/``e2e``/``baseline`` time the project's own step path (engine + method, or the trainer itself);
``baseline.py`` is the one module here that imports nothing from ``pipeline``: it is the bare loop the trainer
is compared against. Results and plots are written by ``report.py``."""
