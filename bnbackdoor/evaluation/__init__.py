"""Studies: one module per question a script asks of stored runs (each reads run folders, never writes them).

=====================================================  ==========================================================
script                                                 module
=====================================================  ==========================================================
``evaluate_models.py``                                 :mod:`.stored` (clean vs manipulated vs defended)
``evaluate_attack_defense_metrics.py``                 :mod:`.defense_table` (defense table, Re-BN sweep, composition)
``run_generate_explanations.py``                       :mod:`.explanations` (explanation grids and distances)
(what those three share)                               :mod:`.common` (row labels, image sets, ``Evaluation``)
``scripts/compare_defenses.py``                        :mod:`.compare_defenses` (every defense × clean-set size)
``scripts/compare_detectors.py``                       :mod:`.detectors` (STRIP, SentiNet, Februus on a stored attack)
``scripts/locate_backdoor.py``                         :mod:`.anatomy` (restore / isolate one parameter group)
``scripts/cam_fit.py``                                 :mod:`.cam_fit` (the best map a CAM resolution can draw)
=====================================================  ==========================================================
"""
