"""A run directory before its first step: the resolved config saved first, and checked on reruns."""

from __future__ import annotations

from raysseg import storage
from raysseg.config import Config, ConfigError, changed_settings, config_from_yaml_text, dump_yaml
from raysseg.rundir import layout


def prepare_run_dir(config: Config) -> None:
    """Save the resolved config first; refuse a run directory written by a different config.

    On a rerun, left-over temp files of an interrupted write are removed (one driver per run dir).
    """
    path = layout.config_file(config.run_dir)
    if storage.exists(path):
        saved = config_from_yaml_text(storage.read_bytes(path).decode("utf-8"), where=path)
        changed = changed_settings(saved, config)
        if changed:
            raise ConfigError(
                f"run directory '{config.run_dir}' was written by another config (differs in "
                f"{', '.join(changed)}); use a new run_dir or the same settings"
            )
        # A rerun after a crash: half-written files of the killed run would never be reused (temp
        # names are unique), so clear them before any step starts writing. Markers, manifests and
        # checkpoints sit a few levels down; per-image shard folders are left to the label update
        # that resumes them.
        storage.remove_temp_files(
            config.run_dir, max_depth=layout.SWEEP_DEPTH, skip_dirs=layout.PER_IMAGE_FOLDERS
        )
        return
    storage.makedirs(config.run_dir)
    storage.write_bytes_atomic(path, dump_yaml(config).encode("utf-8"))
