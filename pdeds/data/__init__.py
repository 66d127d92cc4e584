"""Data files: coefficients, fields and reference solutions in HDF5, with XDMF sidecars."""

from __future__ import annotations

from pdeds.data.fields import FieldWriter, write_fields
from pdeds.data.hdf5 import (
    open_checked,
    read_coefficients,
    read_fields,
    write_coefficients,
)
from pdeds.data.problem import check_problem
from pdeds.data.summary import inspect
from pdeds.data.verify import verify
from pdeds.data.xdmf import write_xdmf

__all__ = [
    "FieldWriter",
    "check_problem",
    "inspect",
    "open_checked",
    "read_coefficients",
    "read_fields",
    "verify",
    "write_coefficients",
    "write_fields",
    "write_xdmf",
]
