"""Every file the package writes or reads back: atomic writes (``atomic``), checkpoint files (``checkpoints``) and the
records of what made an output folder (``records``: a training run's config.json, a data folder's settings record).
The names below are the package's one file API; import them from here."""

from guided_diffusion.fileio.atomic import (
    TEMP_TAG,
    DiskFullError,
    atomic_dir,
    atomic_write,
    is_temp_name,
    json_default,
    save_npz,
    sweep_temp_files,
    temp_path,
    torch_save,
    write_bytes,
    write_csv,
    write_json,
    write_text,
)
from guided_diffusion.fileio.checkpoints import (
    CHECKPOINT_KINDS,
    CheckpointName,
    UnreadableCheckpointError,
    checkpoint_name,
    checkpoint_paths,
    checkpoint_problem,
    find_checkpoint,
    format_rate,
    latest_training_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_state_dict_into,
    parse_checkpoint_name,
    state_dict_mismatch,
)
from guided_diffusion.fileio.records import (
    CONFIG_FORMAT,
    CONFIG_FORMAT_VERSION,
    CONFIG_NAME,
    RunConfigError,
    check_settings_record,
    config_path,
    read_run_config,
    write_run_config,
    write_settings_record,
)

__all__ = [
    "TEMP_TAG", "DiskFullError", "atomic_dir", "atomic_write", "is_temp_name", "json_default", "save_npz",
    "sweep_temp_files", "temp_path", "torch_save", "write_bytes", "write_csv", "write_json", "write_text",
    "CHECKPOINT_KINDS", "CheckpointName", "UnreadableCheckpointError", "checkpoint_name", "checkpoint_paths",
    "checkpoint_problem", "find_checkpoint", "format_rate", "latest_training_checkpoint", "list_checkpoints",
    "load_checkpoint", "load_state_dict_into", "parse_checkpoint_name", "state_dict_mismatch", "CONFIG_FORMAT",
    "CONFIG_FORMAT_VERSION", "CONFIG_NAME", "RunConfigError", "check_settings_record", "config_path",
    "read_run_config", "write_run_config", "write_settings_record",
]
