"""Re-BN moved to :mod:`bnbackdoor.defenses.rebn` (registered there as the defense ``rebn``); this module keeps the
old import path working."""
from .defenses.rebn import (NO_BN_NOTICE, LayerShift, RebnReport, bn_layers, calibration_set, rebn,  # noqa: F401
                            rebn_batch_size)

__all__ = ["rebn", "RebnReport", "LayerShift", "calibration_set", "bn_layers", "rebn_batch_size", "NO_BN_NOTICE"]
