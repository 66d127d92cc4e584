"""Is a data file made for this problem? The one check every reader of a ``pdeds data`` file
(trainer's data.path / val_path, eval, predict, solve) runs before using it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pdeds.data.hdf5 import open_checked, py_value
from pdeds.data.integrity import PathLike, reading
from pdeds.errors import PdedsError


def check_problem(
    path: PathLike,
    problem: Any,
    *,
    key: str,
    res: int | None = None,
    fields: Sequence[str] = (),
    samples: int | None = None,
    settable: bool = True,
) -> dict[str, Any]:
    """Check that a data file was made for ``problem`` before it is used for it.

    Args:
        path: the data file.
        problem: the problem it is for: anything with attributes dim, eta, modes, family (and
            f, checked when ``fields`` holds "u_ref": a reference solution depends on it), such
            as :class:`pdeds.config.ProblemConfig`.
        key: what names the file in messages ("data.path", "data.val_path", "--coeffs").
        res: a resolution the file must hold as a complete group, with ``fields``.
        fields: datasets needed at ``res`` (e.g. ("u_ref",)); only with ``res``.
        samples: how many samples the caller will take; the file must hold at least these.
        settable: whether the problem is a config the user can change (``problem.<key>``);
            False for a trained run's, where the only fix is another file.

    Returns:
        The file's root attributes (as :func:`read_coefficients` gives them).

    Raises:
        PdedsError: the first key that differs, naming the file's and the problem's value and
            both fixes (change the problem, or regenerate the file).
    """
    with open_checked(path, res=[] if res is None else [res], fields=fields) as f:
        with reading(path, "its attributes"):
            meta = {k: py_value(v) for k, v in f.attrs.items()}
            held = int(f["coeffs"].shape[0])
    checked = ["dim", "modes", "eta", "family"] + (["f"] if "u_ref" in fields else [])
    for name in checked:
        want = getattr(problem, name)
        if name not in meta:
            raise PdedsError(
                f"{key} {path} does not record {name} (problem.{name} is {want}); "
                f"regenerate it with `pdeds data`"
            )
        got = meta[name]
        same = (
            math.isclose(float(got), float(want), rel_tol=1e-12, abs_tol=0.0)
            if name in ("eta", "f")
            else got == want
        )
        if not same:
            redo = (
                f"`pdeds solve --coeffs {path} --f {want} --res {res} --out ...`"
                if name == "f"
                else f"`pdeds data --{name} {want} ...`"
            )
            change = f"set problem.{name}: {got}, or " if settable else ""
            raise PdedsError(
                f"{key} {path} was made for {name}={got} but problem.{name} is {want}; "
                f"{change}regenerate the file with {redo}"
            )
    if samples is not None and samples > held:
        raise PdedsError(
            f"{key} {path} holds {held} samples but {samples} are asked for; ask for at most "
            f"{held}, or regenerate it with `pdeds data --samples {samples} ...`"
        )
    return meta
