"""KD methods, one file each, registered by name: ``build_methods("ce+kd+vitkd", options, student, teacher)``.

Importing this package registers every method (ce, kd, nkd, vitkd, scalekd); see
:mod:`student.methods.base` for the contract.
"""

from . import ce, kd, nkd, scalekd, vitkd  # noqa: F401  (registration)
from .base import (
    KDMethod,
    MethodOptions,
    Needs,
    StudentInfo,
    StudentOutput,
    TeacherContext,
    build_methods,
    check_cache,
    method_names,
    needs_of,
    register,
    student_forward,
    student_info,
    union_needs,
)

__all__ = [
    "KDMethod",
    "MethodOptions",
    "Needs",
    "StudentInfo",
    "StudentOutput",
    "TeacherContext",
    "build_methods",
    "check_cache",
    "method_names",
    "needs_of",
    "register",
    "student_forward",
    "student_info",
    "union_needs",
]
