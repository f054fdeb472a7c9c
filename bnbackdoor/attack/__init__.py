"""The attack: one validated parameter record per run and the procedures that plant a backdoor.

* :mod:`.params`   ``AttackParams`` (the ancestor's JSON fields, validated), grids, attack id -> file / folder;
* :mod:`.ids`      the catalogue of known ids (``attack.py --list``);
* :mod:`.finetune` explanation-aware fine-tuning of a clean model (the paper's attacks);
* :mod:`.scratch`  classic poisoning: a model trained from scratch on a poisoned training set;
* :mod:`.gradlog`  per-step update capture of one block (``--grad-layer``).
"""
