"""Config: load YAML (with `defaults:` inheritance), apply `key=value` overrides, validate -> RunConfig.

schema.py (sections, RunConfig), load.py (files, inheritance, overrides), fields.py (keys and
types against the HF classes and ftlib's dataclasses), ranges.py (the valid interval of every
numeric value, one table), validate.py (the whole config, and with_values for sweep elements),
secrets.py (tokens from private files named by *_FILE variables). Every error is one line
naming the file or the command line, the key and the fix; the CLI turns a ConfigError into exit
status 2 before any work starts.
"""
from .load import load_config
from .schema import (COMMAND_LINE, ConfigError, ContainerSection, DataSection, DistributedSection,
                     ExportSection, ModelSection, RunConfig, SlurmSection, StorageSection, TrackingSection)
from .validate import extra_sbatch_options, print_notes, slurm_time_minutes, validate, with_values

__all__ = ["COMMAND_LINE", "ConfigError", "ContainerSection", "DataSection", "DistributedSection", "ExportSection",
           "ModelSection", "RunConfig", "SlurmSection", "StorageSection", "TrackingSection", "extra_sbatch_options",
           "load_config", "print_notes", "slurm_time_minutes", "validate", "with_values"]
