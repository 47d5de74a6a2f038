"""Baseline decomposition methods compared against module stemming (seed paper, Table 1)."""
from modsplit.app.baselines.pan_rajan import (METHODS, PanRajanModules, decompose_pan_rajan,
                                          value_set_jaccard)

__all__ = ["METHODS", "PanRajanModules", "decompose_pan_rajan", "value_set_jaccard"]
