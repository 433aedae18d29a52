"""Tuning campaigns, the pure half: the search space, the campaign's search state on disk (its
definition and the Optuna study) and the results table. Ray Tune drives them from
`raysseg.distributed.tune`. Import the submodules directly: `space`, `study`, `results`."""
