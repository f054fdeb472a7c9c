"""bnbackdoor.attack.regimes: one record per regime name, and the texts the run and the catalogue take from it."""
from __future__ import annotations

from pathlib import Path

from bnbackdoor.attack import regimes
from bnbackdoor.attack.params import NO_EFFECT, REGIMES, resolve_attack

ROOT = Path(__file__).resolve().parents[1]


def test_every_regime_name_has_one_record_and_one_table_entry():
    assert tuple(regimes.REGIMES) == REGIMES == tuple(NO_EFFECT)


def test_the_records_say_how_each_model_comes_about():
    finetuned = resolve_attack("154", root=ROOT)
    scratch = resolve_attack("GTSRBR20-badnets-10", root=ROOT)
    ft, sc = regimes.REGIMES["finetune"], regimes.REGIMES["scratch"]
    assert ft.fine_tunes_base and not sc.fine_tunes_base and (ft.step, sc.step) == ("fine-tuning", "training")
    assert ft.provenance(finetuned) == {"base_model": f"{finetuned.modeltype}/model_{finetuned.model_id}"}
    assert sc.provenance(scratch)["base_model"] is None
    assert f"Adam lr {finetuned.learning_rate:g}" in ft.recipe(finetuned)
    # in scratch learning_rate is the one-cycle SGD peak (experimentsettings/README.md)
    assert f"one-cycle lr peaking at {scratch.learning_rate:g}" in sc.recipe(scratch)
