"""The run's config: the schema (tasks.config.schema) and the presets with their overlay (tasks.config.presets)."""
from tasks.config.presets import config_from, load_config, preset
from tasks.config.schema import (InputSanityConfig, LabelResize, PipelineConfig, PresetName, flatten_fields,
                                 parse_config)

__all__ = ["InputSanityConfig", "config_from", "LabelResize", "PipelineConfig", "PresetName", "flatten_fields", "load_config",
           "parse_config", "preset"]
