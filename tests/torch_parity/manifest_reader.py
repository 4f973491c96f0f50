"""What parity.py and vit_parity.py share: reading a dump (manifest_writer.hpp's format), the
relative error they bound, the report they print, and running the dump program.

Imported after the scripts' own torch/numpy import check (it needs numpy).
"""

import math
import os
import subprocess
import tempfile

import numpy as np


class Case:
    """One dumped case: its options (case line), float64 tensors, parameter flags and scalars."""

    def __init__(self, name, options, cast):
        self.name = name
        self.options = options
        self.cast = cast    # what opt() converts an option to unless told
        self.tensors = {}   # name -> float64 numpy array
        self.params = {}    # name -> {"trainable": bool, "grad": bool}, in dump order
        self.scalars = {}   # key -> string

    def opt(self, key, cast=None):
        return (cast or self.cast)(self.options[key])


def read_dump(folder, cast=str):
    """The cases of folder/manifest.txt, in dump order; `cast` converts Case.opt's values by default."""
    cases = {}
    with open(os.path.join(folder, "manifest.txt")) as manifest:
        for number, line in enumerate(manifest, 1):
            fields = line.split()
            if not fields:
                continue
            kind = fields[0]
            if kind == "case":
                cases[fields[1]] = Case(fields[1], dict(field.split("=", 1) for field in fields[2:]), cast)
            elif kind == "tensor":
                case, name, file, ndim = fields[1], fields[2], fields[3], int(fields[4])
                shape = tuple(int(d) for d in fields[5:5 + ndim])
                data = np.fromfile(os.path.join(folder, file), dtype="<f4")
                if data.size != math.prod(shape):
                    raise RuntimeError(f"{file}: {data.size} values, shape {shape}")
                cases[case].tensors[name] = data.reshape(shape).astype(np.float64)
            elif kind == "param":
                flags = dict(field.split("=", 1) for field in fields[3:])
                cases[fields[1]].params[fields[2]] = {"trainable": flags["trainable"] == "1",
                                                      "grad": flags["grad"] == "1"}
            elif kind == "scalar":
                cases[fields[1]].scalars[fields[2]] = fields[3]
            else:
                raise RuntimeError(f"manifest line {number}: unknown record {kind!r}")
    return list(cases.values())


def relative_error(ours, ref):
    """max|ours - ref| / max|ref| (absolute when ref is all zero), and a note on the scale."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        return math.inf, f"shape {ours.shape} != reference {ref.shape}"
    if not np.all(np.isfinite(ours)):
        return math.inf, "non-finite values"
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    diff = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    if scale == 0.0:
        return diff, "max|ref| = 0, absolute error"
    return diff / scale, f"max|ref| {scale:.3e}"


class Report:
    """Prints one line per comparison or check and counts the failures."""

    def __init__(self, tolerance, case_width=32, what_width=34):
        self.tolerance = tolerance
        self.failures = 0
        self.case_width, self.what_width = case_width, what_width

    def line(self, ok, case, what, detail):
        self.failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {case:{self.case_width}s} {what:{self.what_width}s} {detail}")

    def compare(self, case, what, ours, ref, tolerance=None):
        error, note = relative_error(ours, ref)
        bound = self.tolerance if tolerance is None else tolerance
        extra = "" if tolerance is None else f"; tolerance {bound:g}"
        self.line(error < bound, case, what, f"rel_err {error:.3e}  ({note}{extra})")

    def check(self, case, what, condition, detail=""):
        self.line(bool(condition), case, what, detail)


def run_dump(dump_exe, keep, prefix, check):
    """Runs the dump program into `keep` (or a temporary folder) and returns check(folder), or 1
    when the program fails."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    with tempfile.TemporaryDirectory(prefix=prefix) as temporary:
        folder = keep or temporary
        run = subprocess.run([dump_exe, folder], env=env)
        if run.returncode != 0:
            print(f"FAIL the dump program exited with {run.returncode}")
            return 1
        return check(folder)
