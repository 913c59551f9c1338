"""The kdcache storage contract: config, manifest, view records and array layout."""

from .config import CacheConfig, InputConfig, JobConfig, OutputConfig, TapConfig, TargetsConfig, TeacherConfig
from .manifest import FeatureInfo, Manifest, TeacherInfo, UnitRecord
from .version import SCHEMA_VERSION, IncompatibleSchemaError, check_compatible
from .views import OpRecord, ViewRecipe, ViewRecord

__all__ = [
    "SCHEMA_VERSION",
    "CacheConfig",
    "FeatureInfo",
    "IncompatibleSchemaError",
    "InputConfig",
    "JobConfig",
    "Manifest",
    "OpRecord",
    "OutputConfig",
    "TapConfig",
    "TargetsConfig",
    "TeacherConfig",
    "TeacherInfo",
    "UnitRecord",
    "ViewRecipe",
    "ViewRecord",
    "check_compatible",
]
