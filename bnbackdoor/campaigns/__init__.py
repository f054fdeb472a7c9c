"""Many runs: grid sweeps (:mod:`.sweep`) and the shipped-model catalogue (:mod:`.catalogue`), each run through
:func:`bnbackdoor.runs.run_attack` under the run folder's one claim and promoted by
:func:`bnbackdoor.runs.promote_run`."""
