"""Deployment: a single TorchScript artifact with packed integer weights and its metadata."""

from gaq_calc.export.artifact import (
    ARTIFACT_FORMAT,
    artifact_metadata,
    export_artifact,
    is_artifact,
    load_artifact,
    rewrite_artifact,
    save_artifact,
)
from gaq_calc.quant.packing import pack_int4, unpack_int4

__all__ = ["ARTIFACT_FORMAT", "artifact_metadata", "export_artifact", "is_artifact", "load_artifact", "pack_int4",
           "rewrite_artifact", "save_artifact", "unpack_int4"]  # fmt: skip
