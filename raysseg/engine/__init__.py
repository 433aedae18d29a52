"""Training engine: metrics, optimiser and schedule, the epoch/evaluation loop, checkpoints.

Plain torch / numpy (no Ray). Import the submodules directly (`raysseg.engine.metrics`, `.optim`,
`.loop`, `.checkpoint`); this package file imports nothing so that reading metrics stays light.
"""
