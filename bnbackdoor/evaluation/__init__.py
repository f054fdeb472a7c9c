"""Studies: one module per question a script asks of stored runs (each reads run folders, never writes them).

=====================================================  ==========================================================
script                                                 module
=====================================================  ==========================================================
``evaluate_models.py``, ``evaluate_attack_defense_      :mod:`.common` (clean vs manipulated vs defended, the Re-BN
metrics.py``, ``run_generate_explanations.py``          sweep, the composition curves, explanation figures)
``scripts/compare_defenses.py``                        :mod:`.compare_defenses` (every defense × clean-set size)
``scripts/locate_backdoor.py``                         :mod:`.anatomy` (restore / isolate one parameter group)
``scripts/cam_fit.py``                                 :mod:`.cam_fit` (the best map a CAM resolution can draw)
=====================================================  ==========================================================
"""
