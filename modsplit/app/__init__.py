"""modsplit's application layer: datasets, model zoo, training recipes, config, reports, the CLI,
the paper's reproduction runner and the Pan & Rajan baselines.

It is built on the library (``modsplit``) and needs the ``app`` extra (pyyaml, matplotlib,
scikit-learn, torchvision). Imports point one way: ``modsplit.app`` imports ``modsplit``; the
library never imports ``modsplit.app`` (tests/test_layout.py checks it).
"""
