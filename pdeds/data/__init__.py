"""Data files: coefficients, fields and reference solutions in HDF5, with XDMF sidecars."""

from __future__ import annotations

from pdeds.data.fields import FieldWriter, write_fields
from pdeds.data.hdf5 import open_checked, read_coefficients, read_fields, write_coefficients
from pdeds.data.summary import inspect
from pdeds.data.xdmf import write_xdmf

__all__ = [
    "FieldWriter",
    "inspect",
    "open_checked",
    "read_coefficients",
    "read_fields",
    "write_coefficients",
    "write_fields",
    "write_xdmf",
]
