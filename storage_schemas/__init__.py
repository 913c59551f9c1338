"""The kdcache storage contract: config, target specs and codecs, manifest, view records, array layout, keys."""

from .codecs import Codec, FidelityAcc, LogitsInfo
from .config import CacheConfig, InputConfig, JobConfig, OutputConfig, TargetsConfig, TeacherConfig
from .errors import CacheError, CacheMismatchError, ConfigError, InputDataError, KDCacheError
from .manifest import Manifest, TeacherInfo, UnitCompletion
from .taps import TapInfo, TapSpec
from .version import SCHEMA_VERSION, IncompatibleSchemaError, check_compatible
from .views import MixRecipe, MixRecord, OpRecord, ViewRecipe, ViewRecord

__all__ = [
    "SCHEMA_VERSION",
    "CacheConfig",
    "CacheError",
    "CacheMismatchError",
    "Codec",
    "ConfigError",
    "FidelityAcc",
    "IncompatibleSchemaError",
    "InputConfig",
    "InputDataError",
    "JobConfig",
    "KDCacheError",
    "LogitsInfo",
    "Manifest",
    "MixRecipe",
    "MixRecord",
    "OpRecord",
    "OutputConfig",
    "TapInfo",
    "TapSpec",
    "TargetsConfig",
    "TeacherConfig",
    "TeacherInfo",
    "UnitCompletion",
    "ViewRecipe",
    "ViewRecord",
    "check_compatible",
]
