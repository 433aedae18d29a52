"""The run directory and the campaign folder: their paths, the step plan, the done markers.

Pure (no Ray, no torch): imports only `raysseg.storage` and `raysseg.config`. Import the
submodules directly: `layout` (paths of a run), `steps` (the typed step plan), `markers` (a step's
done marker), `prepare` (the resolved config written first), `campaign` (paths of a tuning
campaign). `raysseg.distributed` executes the steps; `verify`, `report` and `tuning` ask here.
"""
